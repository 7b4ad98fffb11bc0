package wan

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// DelayTransport wraps a node's gossip transport so that what the node
// sends reaches each other node one one-way delay later, by the
// destination's region: packets are held for the delay, and each stream the
// node dials carries both of its directions with the delay (so the
// listening side needs no wrapper; its incoming streams come from peers'
// DelayTransports). Use it in node.Options.WrapTransport, inside a
// faultkit.Partition to cut gossip as well.
type DelayTransport struct {
	memberlist.NodeAwareTransport
	topo   Topology
	self   string
	max    int
	stats  Stats
	noLink *link // streams are never cut here (faultkit.Partition cuts)

	mu     sync.Mutex
	queues map[string]*packetQueue // by destination region
	conns  map[*delayedConn]struct{}
	closed bool
	stop   chan struct{} // closed by Shutdown
	wg     sync.WaitGroup
}

// NewDelayTransport wraps t for a node in region self.
func NewDelayTransport(t memberlist.NodeAwareTransport, topo Topology, self string) *DelayTransport {
	return &DelayTransport{NodeAwareTransport: t, topo: topo, self: self, max: DefaultMaxBuffer,
		noLink: newLink(), queues: map[string]*packetQueue{}, conns: map[*delayedConn]struct{}{}, stop: make(chan struct{})}
}

// Stats reads the transport's counters.
func (t *DelayTransport) Stats() StatsSnapshot { return t.stats.Snapshot() }

func (t *DelayTransport) delayTo(addr string) (string, time.Duration) {
	r, ok := t.topo.RegionOf(addr)
	if !ok {
		return "", 0
	}
	return r, t.topo.Delay(t.self, r)
}

// packetQueue holds the packets for one region, in order.
type packetQueue struct {
	mu    sync.Mutex
	q     []queuedPacket
	bytes int
	wake  chan struct{}
}

type queuedPacket struct {
	b   []byte
	a   memberlist.Address
	due time.Time
}

// WriteTo implements memberlist.Transport.
func (t *DelayTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

// WriteToAddress implements memberlist.NodeAwareTransport. Like a packet
// on a real network it is "sent" now and arrives later; a packet that finds
// its region's queue full is dropped (and counted).
func (t *DelayTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	region, d := t.delayTo(a.Addr)
	if d == 0 {
		return t.NodeAwareTransport.WriteToAddress(b, a)
	}
	now := time.Now()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return now, errors.New("wan: transport shut down")
	}
	pq := t.queues[region]
	if pq == nil {
		pq = &packetQueue{wake: make(chan struct{}, 1)}
		t.queues[region] = pq
		t.wg.Add(1)
		go t.sendPackets(pq)
	}
	t.mu.Unlock()
	pq.mu.Lock()
	if pq.bytes+len(b) > t.max {
		pq.mu.Unlock()
		t.stats.packetsDropped.Add(1)
		return now, nil
	}
	// memberlist may reuse b once this returns.
	pq.q = append(pq.q, queuedPacket{b: append([]byte(nil), b...), a: a, due: now.Add(d)})
	pq.bytes += len(b)
	pq.mu.Unlock()
	t.stats.packetsDelayed.Add(1)
	poke(pq.wake)
	return now, nil
}

func (t *DelayTransport) sendPackets(pq *packetQueue) {
	defer t.wg.Done()
	for {
		pq.mu.Lock()
		if len(pq.q) == 0 {
			pq.mu.Unlock()
			select {
			case <-pq.wake:
			case <-t.stop:
				return
			}
			continue
		}
		p := pq.q[0]
		pq.mu.Unlock()
		if !sleepUntil(p.due, t.stop) {
			return
		}
		_, _ = t.NodeAwareTransport.WriteToAddress(p.b, p.a)
		pq.mu.Lock()
		pq.q[0] = queuedPacket{}
		pq.q = pq.q[1:]
		pq.bytes -= len(p.b)
		pq.mu.Unlock()
	}
}

// DialTimeout implements memberlist.Transport.
func (t *DelayTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport: the dial
// takes the handshake's round trip, and the stream it returns delays both
// directions.
func (t *DelayTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	_, d := t.delayTo(a.Addr)
	if d == 0 {
		return t.NodeAwareTransport.DialAddressTimeout(a, timeout)
	}
	start := time.Now()
	if !t.topo.NoHandshake {
		// SYN and SYN-ACK.
		if 2*d >= timeout {
			sleepUntil(start.Add(timeout), t.stop)
			return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
		}
		if !sleepUntil(start.Add(2*d), t.stop) {
			return nil, errors.New("wan: transport shut down")
		}
	}
	c, err := t.NodeAwareTransport.DialAddressTimeout(a, timeout-time.Since(start))
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		_ = c.Close()
		return nil, errors.New("wan: transport shut down")
	}
	dc := newDelayedConn(c, d, t.noLink, t.max, &t.stats)
	t.conns[dc] = struct{}{}
	t.wg.Add(1)
	t.mu.Unlock()
	t.stats.conns.Add(1)
	go func() {
		defer t.wg.Done()
		dc.run()
		t.mu.Lock()
		delete(t.conns, dc)
		t.mu.Unlock()
	}()
	return dc, nil
}

// Shutdown implements memberlist.Transport: it stops the delayed packets
// and streams, then the wrapped transport.
func (t *DelayTransport) Shutdown() error {
	t.mu.Lock()
	if !t.closed {
		close(t.stop)
	}
	t.closed = true
	conns := make([]*delayedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		c.abort()
	}
	t.wg.Wait()
	return t.NodeAwareTransport.Shutdown()
}

var _ memberlist.NodeAwareTransport = (*DelayTransport)(nil)

// delayedConn is the dialing side of a stream whose two directions are
// each delayed: Write queues for the wire, Read returns what arrived.
type delayedConn struct {
	c        net.Conn
	up, down *delayQueue
	delay    time.Duration

	readDL, writeDL atomic.Pointer[time.Time]

	rmu      sync.Mutex
	leftover []byte // the unread rest of a chunk; guarded by rmu
	readErr  error  // sticky once the stream ended; guarded by rmu

	wmu      sync.Mutex
	writeErr error // guarded by wmu

	closeOnce sync.Once
	closed    chan struct{} // closed by Close
	abortOnce sync.Once
	aborted   chan struct{}
}

func newDelayedConn(c net.Conn, d time.Duration, l *link, max int, stats *Stats) *delayedConn {
	return &delayedConn{c: c, delay: d, up: newDelayQueue(d, l, max, stats), down: newDelayQueue(d, l, max, stats),
		closed: make(chan struct{}), aborted: make(chan struct{})}
}

// run carries both directions until the stream is done.
func (dc *delayedConn) run() {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		pump(dc.c, dc.down, true)
	}()
	dc.sendLoop()
	// The app closed and its last bytes and FIN went out (or the stream
	// failed). Give the far end the time to read them and close too before
	// closing the socket: closing with unread bytes would reset it.
	_ = dc.c.SetReadDeadline(time.Now().Add(2*dc.delay + time.Second))
	wg.Wait()
	dc.abort()
}

func (dc *delayedConn) sendLoop() {
	for {
		ch, err := dc.up.take(nil)
		if err != nil {
			return
		}
		if ch.end != nil {
			closeWrite(dc.c)
			return
		}
		if _, err := dc.c.Write(ch.b); err != nil {
			dc.wmu.Lock()
			dc.writeErr = err
			dc.wmu.Unlock()
			dc.up.close()
			return
		}
	}
}

func (dc *delayedConn) abort() {
	dc.abortOnce.Do(func() {
		close(dc.aborted)
		dc.up.close()
		dc.down.close()
		_ = dc.c.Close()
	})
}

func deadlineOf(p *atomic.Pointer[time.Time]) func() time.Time {
	return func() time.Time {
		if t := p.Load(); t != nil {
			return *t
		}
		return time.Time{}
	}
}

// Read implements net.Conn.
func (dc *delayedConn) Read(b []byte) (int, error) {
	dc.rmu.Lock()
	defer dc.rmu.Unlock()
	select {
	case <-dc.closed:
		return 0, net.ErrClosed
	default:
	}
	if len(dc.leftover) == 0 {
		if dc.readErr != nil {
			return 0, dc.readErr
		}
		ch, err := dc.down.take(deadlineOf(&dc.readDL))
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return 0, err
		case err != nil:
			dc.readErr = io.EOF
			return 0, dc.readErr
		case ch.end != nil:
			dc.readErr = ch.end
			return 0, ch.end
		}
		dc.leftover = ch.b
	}
	n := copy(b, dc.leftover)
	dc.leftover = dc.leftover[n:]
	return n, nil
}

// Write implements net.Conn: it returns once the bytes are queued for the
// wire (as a kernel's send buffer would), waiting only when MaxBuffer is
// in flight.
func (dc *delayedConn) Write(b []byte) (int, error) {
	select {
	case <-dc.closed:
		return 0, net.ErrClosed
	default:
	}
	dc.wmu.Lock()
	err := dc.writeErr
	dc.wmu.Unlock()
	if err != nil {
		return 0, err
	}
	n := 0
	for len(b) > 0 {
		k := min(len(b), chunkSize)
		if err := dc.up.put(append([]byte(nil), b[:k]...), nil, deadlineOf(&dc.writeDL)); err != nil {
			if errors.Is(err, errQueueClosed) {
				err = net.ErrClosed
			}
			return n, err
		}
		n += k
		b = b[k:]
	}
	return n, nil
}

// Close implements net.Conn: queued bytes still go out, then a FIN.
func (dc *delayedConn) Close() error {
	dc.closeOnce.Do(func() {
		close(dc.closed)
		_ = dc.up.put(nil, io.EOF, nil)
		dc.down.close() // nobody reads any more
	})
	return nil
}

func (dc *delayedConn) LocalAddr() net.Addr  { return dc.c.LocalAddr() }
func (dc *delayedConn) RemoteAddr() net.Addr { return dc.c.RemoteAddr() }

// SetDeadline implements net.Conn.
func (dc *delayedConn) SetDeadline(t time.Time) error {
	_ = dc.SetReadDeadline(t)
	return dc.SetWriteDeadline(t)
}

// SetReadDeadline implements net.Conn; a blocked Read sees the change.
func (dc *delayedConn) SetReadDeadline(t time.Time) error {
	dc.readDL.Store(&t)
	poke(dc.down.ready)
	return nil
}

// SetWriteDeadline implements net.Conn; a blocked Write sees the change.
func (dc *delayedConn) SetWriteDeadline(t time.Time) error {
	dc.writeDL.Store(&t)
	poke(dc.up.space)
	return nil
}
