package faultkit

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Partition wraps a node's gossip transport so that a test can cut the
// network between the node and chosen peer IPs, in both directions, then
// heal it. While a peer is cut, packets to and from it are dropped, dials
// to it are refused and streams from it are closed, and the streams open
// across the cut when it starts break (reads and writes fail, nothing more
// is carried), as a real partition ends them once their timeouts run out.
//
// Peers are told apart by IP. memberlist's transport dials without
// choosing a source address, so on one machine every stream arrives from
// 127.0.0.1 whatever node dialed it; the Partitions of one process
// therefore record which node dialed each stream (by the stream's local
// address), and the accepting side looks the dialer up there. A stream
// from a node without a Partition is judged by its remote address.
type Partition struct {
	memberlist.NodeAwareTransport

	mu       sync.Mutex
	self     string                  // this node's advertised IP; guarded by mu
	blocked  map[string]bool         // peer IP → cut; guarded by mu
	conns    map[*partConn]struct{}  // open streams; guarded by mu
	packets  chan *memberlist.Packet // filtered PacketCh
	streams  chan net.Conn           // filtered StreamCh
	stop     chan struct{}           // closed by Shutdown
	shut     chan struct{}           // closed once the wrapped transport shut down
	once     sync.Once
	shutOnce sync.Once
}

// dialers maps the local address of a stream dialed through a Partition
// ("127.0.0.1:40112") to the advertised IP of the node that dialed it.
// Entries live as long as their stream.
var dialers sync.Map

// NewPartition wraps t. Use it as the node's WrapTransport (outermost, or
// around a transport that delays: it sees what memberlist sends).
func NewPartition(t memberlist.NodeAwareTransport) *Partition {
	p := &Partition{
		NodeAwareTransport: t, blocked: map[string]bool{}, conns: map[*partConn]struct{}{},
		packets: make(chan *memberlist.Packet), streams: make(chan net.Conn), stop: make(chan struct{}), shut: make(chan struct{}),
	}
	go p.filterPackets()
	go p.filterStreams()
	return p
}

// FinalAdvertiseAddr implements memberlist.Transport; it learns the IP
// this node's streams are to be known by.
func (p *Partition) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	addr, port, err := p.NodeAwareTransport.FinalAdvertiseAddr(ip, port)
	if err == nil {
		p.mu.Lock()
		p.self = addr.String()
		p.mu.Unlock()
	}
	return addr, port, err
}

// Block cuts traffic to and from the given IPs, and breaks the streams open
// with them.
func (p *Partition) Block(ips ...string) {
	var cut []*partConn
	p.mu.Lock()
	for _, ip := range ips {
		p.blocked[ip] = true
	}
	for c := range p.conns {
		if p.blocked[c.peerIP()] {
			cut = append(cut, c)
		}
	}
	p.mu.Unlock()
	for _, c := range cut {
		c.cut()
	}
}

// Heal restores all traffic.
func (p *Partition) Heal() {
	p.mu.Lock()
	p.blocked = map[string]bool{}
	p.mu.Unlock()
}

// Blocked reports whether traffic with ip is cut.
func (p *Partition) Blocked(ip string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blocked[hostOf(ip)]
}

func hostOf(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// ErrPartitioned is what a dial to a cut peer, or a stream broken by a
// cut, returns.
var ErrPartitioned = errors.New("network partitioned (test)")

func (p *Partition) filterPackets() {
	in := p.NodeAwareTransport.PacketCh()
	for {
		select {
		case <-p.stop:
			p.drainPackets(in)
			return
		case pkt, ok := <-in:
			if !ok {
				return
			}
			if p.Blocked(pkt.From.String()) {
				continue
			}
			select {
			case p.packets <- pkt:
			case <-p.stop:
				p.drainPackets(in)
				return
			}
		}
	}
}

// drainPackets drops the packets the wrapped transport still hands over
// while it shuts down: memberlist's NetTransport hands a packet it read
// over with no way out, so its Shutdown, which waits for its listeners,
// would never return.
func (p *Partition) drainPackets(in <-chan *memberlist.Packet) {
	for {
		select {
		case <-in:
		case <-p.shut:
			return
		}
	}
}

func (p *Partition) filterStreams() {
	in := p.NodeAwareTransport.StreamCh()
	for {
		select {
		case <-p.stop:
			p.drain(in)
			return
		case conn, ok := <-in:
			if !ok {
				return
			}
			pc, ok := p.track(conn, "", "")
			if !ok {
				conn.Close()
				continue
			}
			select {
			case p.streams <- pc:
			case <-p.stop:
				pc.Close()
				p.drain(in)
				return
			}
		}
	}
}

// drain closes the streams the wrapped transport still hands over while
// it shuts down: its listener blocks handing over one accepted just before,
// and would never end.
func (p *Partition) drain(in <-chan net.Conn) {
	shut := p.shut
	var grace <-chan time.Time
	for {
		select {
		case conn := <-in:
			conn.Close()
		case <-shut:
			shut, grace = nil, time.After(100*time.Millisecond)
		case <-grace:
			return
		}
	}
}

// track wraps a stream with peer (for an accepted stream, "": it is
// looked up), unless peer is cut. A dialed stream (key set) is recorded in
// dialers for the accepting side.
func (p *Partition) track(conn net.Conn, peer, key string) (*partConn, bool) {
	pc := &partConn{Conn: conn, p: p, peer: peer, key: key, remote: conn.RemoteAddr().String()}
	ip := pc.peerIP()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.blocked[ip] {
		return nil, false
	}
	p.conns[pc] = struct{}{}
	if key != "" && p.self != "" {
		dialers.Store(key, p.self)
	}
	return pc, true
}

func (p *Partition) untrack(pc *partConn) {
	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
	if pc.key != "" {
		dialers.CompareAndDelete(pc.key, p.selfIP())
	}
}

func (p *Partition) selfIP() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.self
}

// PacketCh implements memberlist.Transport.
func (p *Partition) PacketCh() <-chan *memberlist.Packet { return p.packets }

// StreamCh implements memberlist.Transport.
func (p *Partition) StreamCh() <-chan net.Conn { return p.streams }

// WriteTo implements memberlist.Transport.
func (p *Partition) WriteTo(b []byte, addr string) (time.Time, error) {
	if p.Blocked(addr) {
		return time.Now(), nil // silently lost, like a packet on a cut link
	}
	return p.NodeAwareTransport.WriteTo(b, addr)
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (p *Partition) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if p.Blocked(a.Addr) {
		return time.Now(), nil
	}
	return p.NodeAwareTransport.WriteToAddress(b, a)
}

// DialTimeout implements memberlist.Transport.
func (p *Partition) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return p.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (p *Partition) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	peer := hostOf(a.Addr)
	if p.Blocked(peer) {
		return nil, ErrPartitioned
	}
	conn, err := p.NodeAwareTransport.DialAddressTimeout(a, timeout)
	if err != nil {
		return nil, err
	}
	pc, ok := p.track(conn, peer, conn.LocalAddr().String())
	if !ok { // cut while dialing
		conn.Close()
		return nil, ErrPartitioned
	}
	return pc, nil
}

// Shutdown implements memberlist.Transport.
func (p *Partition) Shutdown() error {
	p.once.Do(func() { close(p.stop) })
	err := p.NodeAwareTransport.Shutdown()
	p.shutOnce.Do(func() { close(p.shut) })
	return err
}

var _ memberlist.NodeAwareTransport = (*Partition)(nil)

// partConn is a stream across the Partition; a cut breaks it.
type partConn struct {
	net.Conn
	p      *Partition
	key    string // the local address, when this side dialed
	remote string // the remote address

	mu      sync.Mutex
	peer    string // the other node's IP, once known; guarded by mu
	broken  bool   // guarded by mu
	closeMu sync.Once
}

// peerIP is the IP of the node at the other end. The dialer of an
// accepted stream records itself just after its dial returns, before it
// writes: a stream accepted earlier than that learns who it is from at the
// latest with its first bytes (Read checks again).
func (c *partConn) peerIP() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.peer != "" {
		return c.peer
	}
	if ip, ok := dialers.Load(c.remote); ok {
		c.peer = ip.(string)
		return c.peer
	}
	return hostOf(c.remote)
}

func (c *partConn) isBroken() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken
}

// cut ends the stream at once: what is unread or unsent is lost.
func (c *partConn) cut() {
	c.mu.Lock()
	c.broken = true
	c.mu.Unlock()
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // reset rather than send what is queued
	}
	_ = c.Close()
}

func (c *partConn) Read(b []byte) (int, error) {
	if c.isBroken() {
		return 0, ErrPartitioned
	}
	n, err := c.Conn.Read(b)
	if c.isBroken() {
		return 0, ErrPartitioned
	}
	if n > 0 && c.key == "" && c.p.Blocked(c.peerIP()) {
		c.cut()
		return 0, ErrPartitioned
	}
	return n, err
}

func (c *partConn) Write(b []byte) (int, error) {
	if c.isBroken() {
		return 0, ErrPartitioned
	}
	return c.Conn.Write(b)
}

func (c *partConn) Close() error {
	var err error
	c.closeMu.Do(func() {
		c.p.untrack(c)
		err = c.Conn.Close()
	})
	return err
}
