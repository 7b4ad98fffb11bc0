package wan_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/wan"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// late is how much later than its delay a byte may arrive on this shared,
// loaded machine (timer and scheduling latency). Lower bounds are exact.
// The delays under test are longer than late, so that a delay applied
// twice is caught by the upper bound.
const late = 60 * time.Millisecond

// server accepts connections on loopback and hands them to the test.
func server(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan net.Conn, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for {
			select {
			case c := <-conns:
				c.Close()
			default:
				return
			}
		}
	})
	return ln.Addr().String(), conns
}

func proxy(t *testing.T, o wan.ProxyOptions) *wan.Proxy {
	t.Helper()
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	p, err := wan.NewProxy(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func accept(t *testing.T, conns <-chan net.Conn, timeout time.Duration) net.Conn {
	t.Helper()
	select {
	case c := <-conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(timeout):
		t.Fatalf("no connection reached the target within %s", timeout)
		return nil
	}
}

func readFull(t *testing.T, c net.Conn, n int, timeout time.Duration) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(timeout))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func within(t *testing.T, what string, got, want time.Duration) {
	t.Helper()
	if got < want || got > want+late {
		t.Errorf("%s took %s, want %s (at most %s late)", what, got, want, late)
	}
}

// Each direction is delayed by its own one-way delay, once: a request
// crosses in Up, its answer in Down, whatever came before on the stream.
func TestProxyDelaysEachDirectionOnce(t *testing.T) {
	addr, conns := server(t)
	const up, down = 120 * time.Millisecond, 150 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: up, Down: down})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	var ups, rtts []time.Duration
	for i := range 5 {
		start := time.Now()
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		b := readFull(t, s, 1, 5*time.Second)
		ups = append(ups, time.Since(start))
		if b[0] != byte(i) {
			t.Fatalf("round %d: got byte %d", i, b[0])
		}
		if _, err := s.Write(b); err != nil {
			t.Fatal(err)
		}
		readFull(t, c, 1, 5*time.Second)
		rtts = append(rtts, time.Since(start))
	}
	for i := range ups {
		if ups[i] < up || rtts[i] < up+down {
			t.Fatalf("round %d faster than the wire: up %s (≥ %s), round trip %s (≥ %s)", i, ups[i], up, rtts[i], up+down)
		}
	}
	slices.Sort(ups)
	slices.Sort(rtts)
	within(t, "median client→target", ups[2], up)
	within(t, "median round trip", rtts[2], up+down)
}

// With the handshake modelled, the target sees the connection one Up delay
// after the dial and the first byte Up+Down after that (SYN, SYN-ACK, data).
func TestProxyHandshake(t *testing.T) {
	addr, conns := server(t)
	const d = 80 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: d, Down: d, Handshake: true})
	start := time.Now()
	c := dial(t, p.Addr())
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	s := accept(t, conns, 5*time.Second)
	accepted := time.Since(start)
	readFull(t, s, 1, 5*time.Second)
	first := time.Since(start)
	if accepted < d {
		t.Errorf("target saw the connection after %s, before the SYN could arrive (%s)", accepted, d)
	}
	within(t, "first byte of a new connection", first, 3*d)
	// Later bytes pay one delay.
	start = time.Now()
	if _, err := c.Write([]byte("y")); err != nil {
		t.Fatal(err)
	}
	readFull(t, s, 1, 5*time.Second)
	within(t, "a later byte", time.Since(start), d)
}

// Chunks written 10 ms apart arrive 10 ms apart, each one delay after it
// was sent: no chunk waits for the one before it to be delayed first.
func TestProxyNoHeadOfLineStall(t *testing.T) {
	addr, conns := server(t)
	const d = 80 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: d, Down: d})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	const n = 10
	sent := make(chan time.Time, n)
	go func() {
		for i := range n {
			sent <- time.Now()
			if _, err := c.Write([]byte{byte(i)}); err != nil {
				return
			}
			time.Sleep(10 * time.Millisecond) // the sender's own pacing, not synchronisation
		}
	}()
	var lat []time.Duration
	for i := range n {
		b := readFull(t, s, 1, 5*time.Second)
		at := time.Now()
		if b[0] != byte(i) {
			t.Fatalf("byte %d arrived as %d: out of order", i, b[0])
		}
		lat = append(lat, at.Sub(<-sent))
	}
	for i, l := range lat {
		if l < d {
			t.Fatalf("chunk %d arrived after %s, before its delay %s", i, l, d)
		}
	}
	slices.Sort(lat)
	within(t, "median chunk", lat[n/2], d)
	if total := lat[n-1]; total > d+late {
		t.Errorf("slowest chunk took %s: chunks queue behind each other (want about %s)", total, d)
	}
}

// A large stream of random bytes arrives whole and in order, in both
// directions at once.
func TestProxyPreservesOrder(t *testing.T) {
	addr, conns := server(t)
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: 20 * time.Millisecond, Down: 10 * time.Millisecond, MaxBuffer: 256 << 10})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	data := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	want := sha256.Sum256(data)
	// The target echoes everything back; the client writes in uneven pieces.
	echoed := make(chan error, 1)
	go func() {
		_, err := io.Copy(s, s)
		if err == nil {
			err = s.(*net.TCPConn).CloseWrite()
		}
		echoed <- err
	}()
	wrote := make(chan error, 1)
	go func() {
		rest := data
		for len(rest) > 0 {
			k := min(len(rest), 1+rng.IntN(70000))
			if _, err := c.Write(rest[:k]); err != nil {
				wrote <- err
				return
			}
			rest = rest[k:]
		}
		wrote <- c.(*net.TCPConn).CloseWrite()
	}()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if err := <-echoed; err != nil {
		t.Fatal(err)
	}
	if len(got) != len(data) || sha256.Sum256(got) != want {
		t.Fatalf("got %d bytes back, want %d, equal=%v", len(got), len(data), bytes.Equal(got, data))
	}
	if st := p.Stats(); st.PeakBuffered > 256<<10 {
		t.Fatalf("a direction held %d bytes, over MaxBuffer %d", st.PeakBuffered, 256<<10)
	}
}

// An orderly close crosses like data, one delay later, and only in its
// direction (a half-close); Reset breaks both ends at once.
func TestProxyClosePropagates(t *testing.T) {
	addr, conns := server(t)
	const d = 70 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: d, Down: d})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	start := time.Now()
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := s.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("target read %d, %v; want EOF", n, err)
	}
	within(t, "FIN", time.Since(start), d)
	// The other direction still works, then closes.
	if _, err := s.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "bye" {
		t.Fatalf("client read %q, %v; want \"bye\" then EOF", got, err)
	}

	c2 := dial(t, p.Addr())
	s2 := accept(t, conns, 5*time.Second)
	p.Reset()
	for _, x := range []net.Conn{c2, s2} {
		x.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := x.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("after Reset a read returned %v; want the connection broken", err)
		}
	}
	// A reset arriving from one end is passed on, one delay later.
	c3 := dial(t, p.Addr())
	s3 := accept(t, conns, 5*time.Second)
	start = time.Now()
	s3.(*net.TCPConn).SetLinger(0)
	s3.Close()
	c3.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c3.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, io.EOF) {
		t.Fatalf("after the target reset, the client read %v; want a reset", err)
	}
	within(t, "reset", time.Since(start), d)
}

// A receiver that stops reading makes the proxy hold at most MaxBuffer
// bytes per direction; the sender is slowed, and nothing is dropped.
func TestProxyBoundsBuffer(t *testing.T) {
	addr, conns := server(t)
	const max = 64 << 10
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: 5 * time.Millisecond, Down: 5 * time.Millisecond, MaxBuffer: max})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	// The target reads nothing while the client writes until its writes
	// block (the kernel's buffers and the proxy's are full).
	block := make([]byte, 256<<10)
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	written := 0
	for range 1000 {
		n, err := c.Write(block)
		written += n
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal(err)
			}
			break
		}
	}
	st := p.Stats()
	if st.PeakBuffered > max || st.Stalls == 0 {
		t.Fatalf("proxy held up to %d bytes (bound %d), stalled %d times", st.PeakBuffered, max, st.Stalls)
	}
	// Everything written still arrives, in order, once the target reads.
	c.(*net.TCPConn).CloseWrite()
	s.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(s)
	if err != nil || len(got) != written {
		t.Fatalf("target read %d bytes, %v; the client wrote %d", len(got), err, written)
	}
}

// Cut blackholes: open streams stall and new connections hang in their
// handshake until Heal; what waited then arrives one delay after the heal.
func TestProxyCut(t *testing.T) {
	addr, conns := server(t)
	const d = 70 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: d, Down: d, Handshake: true})
	c := dial(t, p.Addr())
	s := accept(t, conns, 5*time.Second)
	p.Cut()
	if _, err := c.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	c2 := dial(t, p.Addr()) // the local connect succeeds; the SYN is lost
	if _, err := c2.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := s.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read %d bytes through a cut link (%v)", n, err)
	}
	select {
	case <-conns:
		t.Fatal("a connection was made through a cut link")
	default:
	}
	healed := time.Now()
	p.Heal()
	readFull(t, s, 1, 5*time.Second)
	within(t, "held byte after the heal", time.Since(healed), d)
	s2 := accept(t, conns, 5*time.Second)
	readFull(t, s2, 1, 5*time.Second)
	within(t, "first byte of a connection made during the cut", time.Since(healed), 3*d)
}

// Connections beyond MaxConns are refused.
func TestProxyMaxConns(t *testing.T) {
	addr, conns := server(t)
	p := proxy(t, wan.ProxyOptions{Target: addr, MaxConns: 2})
	for range 2 {
		dial(t, p.Addr())
		accept(t, conns, 5*time.Second)
	}
	// The reset may reach the third client while it is still connecting,
	// or on its first read.
	if c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second); err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("third connection read %v; want it refused", err)
		}
	}
	if st := p.Stats(); st.Refused != 1 || st.Conns != 2 {
		t.Fatalf("stats %+v; want 2 connections and 1 refused", st)
	}
}

// A target that refuses the connection (or resets it before the dial
// returns) is reported to the client one Down delay later, not at once.
func TestProxyRefusalCrossesBack(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	const d = 70 * time.Millisecond
	p := proxy(t, wan.ProxyOptions{Target: addr, Up: d, Down: d})
	start := time.Now()
	c := dial(t, p.Addr())
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, io.EOF) {
		t.Fatalf("the client read %v; want a reset", err)
	}
	within(t, "refusal", time.Since(start), d)
}
