package wan

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// ProxyOptions configure a Proxy.
type ProxyOptions struct {
	Listen string // host:port to listen on; port 0 picks one
	Target string // host:port every connection is forwarded to
	// Up delays what the client sends to the target, Down what the target
	// sends back (one-way delays).
	Up, Down time.Duration
	// Handshake models TCP's handshake: the target sees a new connection
	// one Up delay after the client's connect, and the client's first
	// bytes leave once the SYN-ACK would have come back (Up+Down later).
	Handshake bool
	// MaxBuffer bounds the bytes one direction of one connection holds;
	// zero means DefaultMaxBuffer.
	MaxBuffer int
	// MaxConns bounds the open connections; more are refused. Zero means
	// 512.
	MaxConns int
}

// Proxy forwards TCP connections to a target, delaying each direction by
// its one-way delay: a chunk read at t is written at t+delay, in order, with
// no bandwidth cap beyond MaxBuffer per delay. Cut blackholes the path
// until Heal; Reset breaks every open connection.
type Proxy struct {
	o     ProxyOptions
	ln    net.Listener
	link  *link
	stats Stats

	mu     sync.Mutex
	conns  map[*proxyConn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewProxy listens on o.Listen and starts forwarding.
func NewProxy(o ProxyOptions) (*Proxy, error) {
	if o.Target == "" {
		return nil, errors.New("wan: proxy without a target")
	}
	if o.Up < 0 || o.Down < 0 {
		return nil, fmt.Errorf("wan: negative delay %s/%s", o.Up, o.Down)
	}
	if o.MaxBuffer == 0 {
		o.MaxBuffer = DefaultMaxBuffer
	}
	if o.MaxConns == 0 {
		o.MaxConns = 512
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("wan: proxy listen on %s: %w", o.Listen, err)
	}
	p := &Proxy{o: o, ln: ln, link: newLink(), conns: map[*proxyConn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address clients connect to.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Cut blackholes the path: open connections stall, new ones hang in their
// handshake, until Heal.
func (p *Proxy) Cut() { p.link.cut() }

// Heal reopens a cut path; what waited arrives one delay later.
func (p *Proxy) Heal() { p.link.heal() }

// IsCut reports whether the path is cut.
func (p *Proxy) IsCut() bool { return p.link.isCut() }

// Reset breaks every open connection (both ends see a reset), as a
// restarted middlebox would. New connections are accepted as before.
func (p *Proxy) Reset() {
	p.mu.Lock()
	conns := make([]*proxyConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.reset()
	}
}

// Stats reads the proxy's counters.
func (p *Proxy) Stats() StatsSnapshot { return p.stats.Snapshot() }

// Close stops listening, breaks every connection and waits for the
// proxy's goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.Reset()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return // closed
		}
		pc := &proxyConn{p: p, client: c, abort: make(chan struct{}), accepted: time.Now(),
			up:   newDelayQueue(p.o.Up, p.link, p.o.MaxBuffer, &p.stats),
			down: newDelayQueue(p.o.Down, p.link, p.o.MaxBuffer, &p.stats)}
		p.mu.Lock()
		if p.closed || len(p.conns) >= p.o.MaxConns {
			p.mu.Unlock()
			p.stats.refused.Add(1)
			resetConn(c)
			continue
		}
		p.conns[pc] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		p.stats.conns.Add(1)
		go pc.run()
	}
}

// proxyConn is one forwarded connection.
type proxyConn struct {
	p        *Proxy
	client   net.Conn
	accepted time.Time

	mu       sync.Mutex
	target   net.Conn // nil until the handshake completes; guarded by mu
	abort    chan struct{}
	once     sync.Once
	up, down *delayQueue // client→target, target→client
}

// reset breaks the connection: both ends see a reset.
func (c *proxyConn) reset() {
	c.once.Do(func() {
		close(c.abort)
		c.up.close()
		c.down.close()
		c.mu.Lock()
		t := c.target
		c.mu.Unlock()
		resetConn(c.client)
		if t != nil {
			resetConn(t)
		}
	})
}

// sleepUntil waits until t; false if the connection was aborted first.
func sleepUntil(t time.Time, abort <-chan struct{}) bool {
	d := time.Until(t)
	if d <= 0 {
		select {
		case <-abort:
			return false
		default:
			return true
		}
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-abort:
		return false
	}
}

func (c *proxyConn) run() {
	p := c.p
	defer func() {
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
		p.wg.Done()
	}()
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		pump(c.client, c.up, false)
	}()
	defer func() {
		c.up.close()
		c.down.close()
		readers.Wait()
	}()

	target, ok := c.handshake()
	if !ok {
		// The target refused or reset the connection before the dial
		// returned: that answer crosses back in one Down delay, as a
		// reset from an open stream does.
		sleepUntil(time.Now().Add(p.o.Down), c.abort)
		c.reset()
		return
	}
	readers.Add(1)
	go func() {
		defer readers.Done()
		pump(target, c.down, false)
	}()
	var writers sync.WaitGroup
	writers.Add(2)
	go func() {
		defer writers.Done()
		c.deliver(c.up, target)
	}()
	go func() {
		defer writers.Done()
		c.deliver(c.down, c.client)
	}()
	writers.Wait()
	// Both directions ended (or the connection broke): close for good,
	// which also ends the readers.
	c.once.Do(func() {
		close(c.abort)
		_ = c.client.Close()
		_ = target.Close()
	})
}

// handshake connects to the target once the client's SYN would have
// arrived there, and tells the up direction when the client could start
// sending.
func (c *proxyConn) handshake() (net.Conn, bool) {
	p := c.p
	if p.o.Handshake {
		// The SYN waits out a cut, then crosses.
		for {
			open, healedAt := p.link.state()
			if p.link.isCut() {
				select {
				case <-open:
					continue // healedAt changed
				case <-c.abort:
					return nil, false
				}
			}
			at := c.accepted
			if healedAt.After(at) {
				at = healedAt
			}
			if !sleepUntil(at.Add(p.o.Up), c.abort) {
				return nil, false
			}
			if !p.link.isCut() {
				break
			}
		}
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	target, err := d.Dial("tcp", p.o.Target)
	if err != nil {
		return nil, false
	}
	c.mu.Lock()
	c.target = target
	c.mu.Unlock()
	select {
	case <-c.abort: // reset while dialing
		resetConn(target)
		return nil, false
	default:
	}
	if p.o.Handshake {
		c.up.setNotBefore(time.Now().Add(p.o.Down))
	}
	return target, true
}

// pump reads src into q until src ends; the end is queued too. Once q is
// closed it returns, or with drain it reads on and discards until src
// ends, so that closing src later does not reset a peer that still had
// bytes in flight.
func pump(src net.Conn, q *delayQueue, drain bool) {
	buf := make([]byte, chunkSize)
	for {
		n, err := src.Read(buf)
		if n > 0 && q != nil {
			if q.put(append([]byte(nil), buf[:n]...), nil, nil) != nil {
				if !drain {
					return
				}
				q = nil
			}
		}
		if err != nil {
			if q != nil {
				_ = q.put(nil, err, nil)
			}
			return
		}
	}
}

// deliver writes q's chunks to dst as they fall due. An orderly end
// half-closes dst; a failed source resets the whole connection.
func (c *proxyConn) deliver(q *delayQueue, dst net.Conn) {
	for {
		ch, err := q.take(nil)
		if err != nil {
			return
		}
		if ch.end != nil {
			if errors.Is(ch.end, io.EOF) {
				closeWrite(dst)
			} else {
				c.reset()
			}
			return
		}
		if _, err := dst.Write(ch.b); err != nil {
			return
		}
	}
}
