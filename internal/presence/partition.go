package presence

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Partition wraps a gossip transport so that tests can cut the network
// between this node and chosen peer IPs, in both directions, then heal it.
// Blocked packets are dropped and blocked streams refused, as a real
// network partition would.
type Partition struct {
	memberlist.NodeAwareTransport

	mu      sync.RWMutex
	blocked map[string]bool // peer IP → cut
	packets chan *memberlist.Packet
	streams chan net.Conn
	stop    chan struct{}
	once    sync.Once
}

// NewPartition wraps t. Use it as Options.WrapTransport.
func NewPartition(t memberlist.NodeAwareTransport) *Partition {
	p := &Partition{
		NodeAwareTransport: t, blocked: map[string]bool{},
		packets: make(chan *memberlist.Packet), streams: make(chan net.Conn), stop: make(chan struct{}),
	}
	go p.filterPackets()
	go p.filterStreams()
	return p
}

// Block cuts traffic to and from the given IPs.
func (p *Partition) Block(ips ...string) {
	p.mu.Lock()
	for _, ip := range ips {
		p.blocked[ip] = true
	}
	p.mu.Unlock()
}

// Heal restores all traffic.
func (p *Partition) Heal() {
	p.mu.Lock()
	p.blocked = map[string]bool{}
	p.mu.Unlock()
}

func (p *Partition) isBlocked(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.blocked[host]
}

var errPartitioned = errors.New("network partitioned (test)")

func (p *Partition) filterPackets() {
	in := p.NodeAwareTransport.PacketCh()
	for {
		select {
		case <-p.stop:
			return
		case pkt, ok := <-in:
			if !ok {
				return
			}
			if p.isBlocked(pkt.From.String()) {
				continue
			}
			select {
			case p.packets <- pkt:
			case <-p.stop:
				return
			}
		}
	}
}

func (p *Partition) filterStreams() {
	in := p.NodeAwareTransport.StreamCh()
	for {
		select {
		case <-p.stop:
			return
		case conn, ok := <-in:
			if !ok {
				return
			}
			if p.isBlocked(conn.RemoteAddr().String()) {
				conn.Close()
				continue
			}
			select {
			case p.streams <- conn:
			case <-p.stop:
				conn.Close()
				return
			}
		}
	}
}

// PacketCh implements memberlist.Transport.
func (p *Partition) PacketCh() <-chan *memberlist.Packet { return p.packets }

// StreamCh implements memberlist.Transport.
func (p *Partition) StreamCh() <-chan net.Conn { return p.streams }

// WriteTo implements memberlist.Transport.
func (p *Partition) WriteTo(b []byte, addr string) (time.Time, error) {
	if p.isBlocked(addr) {
		return time.Now(), nil // silently lost, like a packet on a cut link
	}
	return p.NodeAwareTransport.WriteTo(b, addr)
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (p *Partition) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if p.isBlocked(a.Addr) {
		return time.Now(), nil
	}
	return p.NodeAwareTransport.WriteToAddress(b, a)
}

// DialTimeout implements memberlist.Transport.
func (p *Partition) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if p.isBlocked(addr) {
		return nil, errPartitioned
	}
	return p.NodeAwareTransport.DialTimeout(addr, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (p *Partition) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if p.isBlocked(a.Addr) {
		return nil, errPartitioned
	}
	return p.NodeAwareTransport.DialAddressTimeout(a, timeout)
}

// Shutdown implements memberlist.Transport.
func (p *Partition) Shutdown() error {
	p.once.Do(func() { close(p.stop) })
	return p.NodeAwareTransport.Shutdown()
}

var _ memberlist.NodeAwareTransport = (*Partition)(nil)
