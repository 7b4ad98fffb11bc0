package faultkit_test

import (
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/faultkit"
)

// node is one gossip transport wrapped in a Partition, bound to ip.
type node struct {
	ip   string
	p    *faultkit.Partition
	addr memberlist.Address
}

func startNode(t *testing.T, ip string) *node {
	t.Helper()
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{ip}, BindPort: 0})
	if err != nil {
		t.Fatal(err)
	}
	p := faultkit.NewPartition(nt)
	t.Cleanup(func() { _ = p.Shutdown() })
	port := nt.GetAutoBindPort()
	// memberlist asks this once at start.
	if _, _, err := p.FinalAdvertiseAddr(ip, port); err != nil {
		t.Fatal(err)
	}
	return &node{ip: ip, p: p, addr: memberlist.Address{Addr: net.JoinHostPort(ip, strconv.Itoa(port))}}
}

func accept(t *testing.T, n *node, within time.Duration) net.Conn {
	t.Helper()
	select {
	case c := <-n.p.StreamCh():
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(within):
		return nil
	}
}

func dialTo(t *testing.T, from, to *node) net.Conn {
	t.Helper()
	c, err := from.p.DialAddressTimeout(to.addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s → %s: %v", from.ip, to.ip, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes b on w and reads it on r within a second.
func roundTrip(w, r net.Conn, b string) error {
	if _, err := w.Write([]byte(b)); err != nil {
		return err
	}
	_ = r.SetReadDeadline(time.Now().Add(time.Second))
	got := make([]byte, len(b))
	if _, err := io.ReadFull(r, got); err != nil {
		return err
	}
	if string(got) != b {
		return errors.New("read " + string(got))
	}
	return nil
}

// The harness's finding: memberlist dials without a source address, so
// every stream between nodes on one machine arrives from 127.0.0.1 and a
// cut that looked at the remote address let the cut node's streams in. A
// cut on the receiving side alone now refuses the cut node's new streams
// and breaks its open ones, while a third node's stream carries on.
func TestPartitionKnowsWhoDialed(t *testing.T) {
	a, b, c := startNode(t, "127.0.0.51"), startNode(t, "127.0.0.52"), startNode(t, "127.0.0.53")

	fromA := dialTo(t, a, b)
	atB := accept(t, b, 5*time.Second)
	if atB == nil {
		t.Fatal("b did not accept a's stream")
	}
	t.Logf("a's stream arrives at b from %s", atB.RemoteAddr())
	if err := roundTrip(fromA, atB, "before"); err != nil {
		t.Fatalf("before the cut: %v", err)
	}
	fromC := dialTo(t, c, b)
	atBfromC := accept(t, b, 5*time.Second)
	if atBfromC == nil {
		t.Fatal("b did not accept c's stream")
	}

	b.p.Block(a.ip) // only b knows of the cut
	if err := roundTrip(fromA, atB, "during"); err == nil {
		t.Fatal("a stream open across the cut still carried data")
	}
	late := dialTo(t, a, b) // a does not refuse: b must
	if _, err := late.Write([]byte("injected")); err != nil {
		t.Fatal(err)
	}
	// b may accept the stream before a has recorded that it dialed it;
	// then the stream breaks with its first bytes.
	if s := accept(t, b, 300*time.Millisecond); s != nil {
		_ = s.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, err := s.Read(make([]byte, 16)); !errors.Is(err, faultkit.ErrPartitioned) {
			t.Fatalf("b read %d bytes from the cut node (remote %s): %v", n, s.RemoteAddr(), err)
		}
	}
	_ = late.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := late.Read(make([]byte, 1)); err == nil {
		t.Fatal("the refused stream stayed open")
	}
	if _, err := b.p.DialAddressTimeout(a.addr, time.Second); !errors.Is(err, faultkit.ErrPartitioned) {
		t.Fatalf("b dialed the cut node: %v", err)
	}
	if err := roundTrip(fromC, atBfromC, "honest"); err != nil {
		t.Fatalf("c's stream suffered from a's cut: %v", err)
	}

	// Packets from a are dropped; c's get through.
	if _, err := a.p.WriteToAddress([]byte("lost"), b.addr); err != nil {
		t.Fatal(err)
	}
	if _, err := c.p.WriteToAddress([]byte("kept"), b.addr); err != nil {
		t.Fatal(err)
	}
	select {
	case pkt := <-b.p.PacketCh():
		if string(pkt.Buf) != "kept" {
			t.Fatalf("b received %q from %s during the cut", pkt.Buf, pkt.From)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("c's packet did not arrive")
	}

	b.p.Heal()
	again := dialTo(t, a, b)
	atB = accept(t, b, 5*time.Second)
	if atB == nil {
		t.Fatal("b refused a after the heal")
	}
	if err := roundTrip(again, atB, "after"); err != nil {
		t.Fatalf("after the heal: %v", err)
	}
	if _, err := a.p.WriteToAddress([]byte("back"), b.addr); err != nil {
		t.Fatal(err)
	}
	select {
	case pkt := <-b.p.PacketCh():
		if string(pkt.Buf) != "back" {
			t.Fatalf("b received %q after the heal", pkt.Buf)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a's packet did not arrive after the heal")
	}
}

// handingOver is a transport whose listener hands over the packets it read
// just before it was shut down, and cannot end before they are taken (as
// memberlist's NetTransport).
type handingOver struct {
	memberlist.NodeAwareTransport
	packets chan *memberlist.Packet
	streams chan net.Conn
}

func (h *handingOver) PacketCh() <-chan *memberlist.Packet { return h.packets }
func (h *handingOver) StreamCh() <-chan net.Conn           { return h.streams }
func (h *handingOver) Shutdown() error {
	for i := 0; i < 2; i++ {
		h.packets <- &memberlist.Packet{Buf: []byte{1}, From: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 7946}}
	}
	return nil
}

// A packet that arrives while the node shuts down does not hang the
// shutdown (found as a presence test hung for 10 minutes under load).
func TestShutdownTakesPacketsHandedOverLate(t *testing.T) {
	p := faultkit.NewPartition(&handingOver{packets: make(chan *memberlist.Packet), streams: make(chan net.Conn)})
	done := make(chan error, 1)
	go func() { done <- p.Shutdown() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown hung on a packet handed over while it ran")
	}
}
