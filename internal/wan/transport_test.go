package wan_test

import (
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/wan"
)

func netTransport(t *testing.T, ip string) *memberlist.NetTransport {
	t.Helper()
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{ip}, BindPort: 0})
	if err != nil {
		t.Fatal(err)
	}
	return nt
}

func addrOf(ip string, nt *memberlist.NetTransport) memberlist.Address {
	return memberlist.Address{Addr: net.JoinHostPort(ip, strconv.Itoa(nt.GetAutoBindPort()))}
}

// Gossip from ams reaches iad one ams↔iad delay later: each packet, and
// each direction of a stream ams dials (whose dial pays the handshake).
// Packets to an address of no region go out at once.
func TestDelayTransport(t *testing.T) {
	topo := wan.DefaultTopology()
	// Longer than the tests' tolerance, so that a delay applied twice
	// shows.
	topo.SetDelay("ams", "iad", 90*time.Millisecond)
	ams, _ := topo.Region("ams")
	iad, _ := topo.Region("iad")
	d := topo.Delay("ams", "iad")
	a := wan.NewDelayTransport(netTransport(t, ams.IP), topo, "ams")
	bt := netTransport(t, iad.IP)
	defer bt.Shutdown()
	stopped := false
	defer func() {
		if !stopped {
			a.Shutdown()
		}
	}()
	b := addrOf(iad.IP, bt)

	var lat []time.Duration
	for i := range 5 {
		start := time.Now()
		if _, err := a.WriteToAddress([]byte{byte(i)}, b); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-bt.PacketCh():
			lat = append(lat, time.Since(start))
			if len(p.Buf) != 1 || p.Buf[0] != byte(i) {
				t.Fatalf("packet %d arrived as %v", i, p.Buf)
			}
			if got, _ := topo.RegionOf(p.From.String()); got != "ams" {
				t.Fatalf("packet from %s, not from ams' address", p.From)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d lost", i)
		}
	}
	for _, l := range lat {
		if l < d {
			t.Fatalf("a packet took %s, less than the delay %s", l, d)
		}
	}
	slices.Sort(lat)
	within(t, "median packet", lat[2], d)

	start := time.Now()
	c, err := a.DialAddressTimeout(b, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	within(t, "dial (handshake)", time.Since(start), 2*d)
	start = time.Now()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	var s net.Conn
	select {
	case s = <-bt.StreamCh():
	case <-time.After(5 * time.Second):
		t.Fatal("no stream arrived")
	}
	defer s.Close()
	readFull(t, s, 4, 5*time.Second)
	within(t, "stream ams→iad", time.Since(start), d)
	start = time.Now()
	if _, err := s.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "pong" {
		t.Fatalf("read %q, %v", got, err)
	}
	within(t, "stream iad→ams", time.Since(start), d)

	// A read deadline applies to the delayed stream.
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.Read(got); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline returned %v", err)
	}
	// Close sends what was written, then the FIN, one delay later.
	c.SetReadDeadline(time.Time{})
	if _, err := c.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	c.Close()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	rest, err := io.ReadAll(s)
	if err != nil || string(rest) != "bye" {
		t.Fatalf("after close the far end read %q, %v", rest, err)
	}
	within(t, "close", time.Since(start), d)

	// Shutdown stops the delayed packets and streams (TestMain checks that
	// no goroutine is left).
	if _, err := a.WriteToAddress([]byte("late"), b); err != nil {
		t.Fatal(err)
	}
	stopped = true
	if err := a.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if st := a.Stats(); st.PacketsDelayed != 6 || st.Conns != 1 || st.PacketsDropped != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// Packets waiting out their delay are bounded in bytes per destination
// region: beyond DefaultMaxBuffer they are dropped, as a full queue on a
// real link would drop them, and counted.
func TestDelayTransportBoundsPackets(t *testing.T) {
	topo := wan.DefaultTopology()
	topo.SetDelay("ams", "syd", time.Second) // all of them wait at once
	ams, _ := topo.Region("ams")
	syd, _ := topo.Region("syd")
	a := wan.NewDelayTransport(netTransport(t, ams.IP), topo, "ams")
	defer a.Shutdown()
	bt := netTransport(t, syd.IP)
	defer bt.Shutdown()
	const size, n = 1400, 1000 // 1.4 MB
	pkt := make([]byte, size)
	for range n {
		if _, err := a.WriteToAddress(pkt, addrOf(syd.IP, bt)); err != nil {
			t.Fatal(err)
		}
	}
	st := a.Stats()
	if st.PacketsDelayed+st.PacketsDropped != n || st.PacketsDropped == 0 || st.PacketsDelayed*size > wan.DefaultMaxBuffer {
		t.Fatalf("%d packets of %d bytes: %d held, %d dropped; want at most %d bytes held and the rest dropped",
			n, size, st.PacketsDelayed, st.PacketsDropped, wan.DefaultMaxBuffer)
	}
}
