// Package faultkit runs load through broker nodes while a test injects
// faults, and accounts for every message. Its peers use the protocol the
// way a careful application does (client_ack, dedupe of redelivered pushes
// by messageId, sends with a client_message_id retried until acked,
// reconnection to the next node), so that what a test reports — lost,
// duplicated, redelivered, recovery time — is what an application would
// see.
package faultkit

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// Retry timings of a peer's sends.
const (
	// retryFirst is the wait before resending a send whose ack reported a
	// transient error; it doubles on each further error, up to retryMax.
	retryFirst = 200 * time.Millisecond
	retryMax   = 2 * time.Second
	// resendAfter resends a send that got no ack at all on a connection
	// that stays up (its ack was lost).
	resendAfter = 5 * time.Second
	// pumpEvery is how often a peer looks for sends that are due.
	pumpEvery = 50 * time.Millisecond
)

// outgoing is a send awaiting its ack.
type outgoing struct {
	send     protocol.Send
	sentOn   *client.Conn // the connection it was last written to
	lastSent time.Time
	retryAt  time.Time // set after a transient ack error
	attempts int
}

// Peer is one application: it stays connected (moving to the next URL
// when a connection fails), acknowledges every push, hands each messageId
// to its application once, and resends each send with the same
// client_message_id until it is acked.
type Peer struct {
	id      client.Identity
	urls    []string
	session string
	caps    []string
	index   int     // in its burst
	ledger  *ledger // nil for a peer outside a burst

	kick chan struct{}

	mu        sync.Mutex
	conn      *client.Conn
	next      int                  // index of the URL to try next
	queue     []string             // client_message_ids awaiting ack, in send order
	pending   map[string]*outgoing // by client_message_id
	acked     map[string]string    // client_message_id → messageId
	seen      map[string]int       // messageId → pushes received (before dedupe)
	events    []protocol.Push      // system events
	ackErrors map[string]int       // transient ack errors, by code
	rejected  map[string]string    // client_message_id → permanent ack error
	conflicts int                  // acks naming another messageId for an acked client_message_id
	resends   int
	connects  int
}

// NewPeer returns a peer for id that first connects to urls[first] (modulo
// their number). caps are announced besides client_ack.
func NewPeer(id client.Identity, urls []string, first int, caps ...string) *Peer {
	return &Peer{
		id: id, urls: urls, next: first, session: "sess-" + id.MemberID, caps: caps,
		kick:    make(chan struct{}, 1),
		pending: map[string]*outgoing{}, acked: map[string]string{}, seen: map[string]int{},
		ackErrors: map[string]int{}, rejected: map[string]string{},
	}
}

// ID is the peer's identity.
func (p *Peer) ID() client.Identity { return p.id }

// Run keeps the peer connected and its sends flowing until ctx ends.
func (p *Peer) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.pump(ctx)
	}()
	for ctx.Err() == nil {
		p.mu.Lock()
		url := p.urls[p.next%len(p.urls)]
		p.mu.Unlock()
		if err := p.connectOnce(ctx, url); err != nil && ctx.Err() == nil {
			p.mu.Lock()
			p.next++ // try the next node
			p.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	wg.Wait()
}

func (p *Peer) connectOnce(ctx context.Context, url string) error {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := client.Dial(dctx, url, nil)
	if err != nil {
		cancel()
		return err
	}
	defer c.CloseNow()
	_, err = c.Hello(dctx, p.id, client.HelloOptions{SessionID: p.session,
		Capabilities: append([]string{protocol.CapClientAck}, p.caps...)})
	cancel()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.conn = c
	p.connects++
	p.mu.Unlock()
	p.wake() // resend what waits, on the new connection
	defer func() {
		p.mu.Lock()
		if p.conn == c {
			p.conn = nil
		}
		p.mu.Unlock()
	}()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			return err
		}
		switch f.Type {
		case protocol.TypeAck:
			var a protocol.Ack
			if f.Decode(&a) == nil {
				p.onAck(a)
			}
		case protocol.TypePush:
			var m protocol.Push
			if f.Decode(&m) != nil {
				continue
			}
			if m.Subtype != "" {
				p.mu.Lock()
				p.events = append(p.events, m)
				p.mu.Unlock()
				continue
			}
			p.onPush(m)
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := c.WriteJSON(wctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: m.MessageID})
			cancel()
			if err != nil {
				return err
			}
		}
	}
}

// transient reports whether an ack error means "try again": nothing was
// committed and a resend may succeed.
func transient(code string) bool {
	switch code {
	case protocol.CodeUnavailable, protocol.CodeInternal, protocol.CodeRateLimited:
		return true
	}
	return false
}

func (p *Peer) onAck(a protocol.Ack) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	o := p.pending[a.ID]
	if !a.Queued {
		if o == nil {
			return
		}
		if !transient(a.Error) {
			p.rejected[a.ID] = a.Error
			delete(p.pending, a.ID)
			return
		}
		p.ackErrors[a.Error]++
		o.attempts++
		o.retryAt = now.Add(min(retryFirst<<min(o.attempts-1, 8), retryMax))
		return
	}
	if prev, ok := p.acked[a.ID]; ok {
		if prev != a.MessageID {
			p.conflicts++
		}
		return
	}
	if o == nil {
		return // an ack for a send this peer never made
	}
	p.acked[a.ID] = a.MessageID
	delete(p.pending, a.ID)
	if p.ledger != nil {
		p.ledger.acked(a.ID, a.MessageID, now)
	}
}

func (p *Peer) onPush(m protocol.Push) {
	now := time.Now()
	p.mu.Lock()
	p.seen[m.MessageID]++
	first := p.seen[m.MessageID] == 1
	p.mu.Unlock()
	if p.ledger != nil {
		p.ledger.pushed(p.index, m, first, now)
	}
}

func (p *Peer) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// pump writes the sends that are due: not yet written on the current
// connection, past their retry time, or unacked for too long.
func (p *Peer) pump(ctx context.Context) {
	tick := time.NewTicker(pumpEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-tick.C:
		}
		now := time.Now()
		p.mu.Lock()
		c := p.conn
		var due []protocol.Send
		if c != nil {
			live := p.queue[:0]
			for _, cmid := range p.queue {
				o := p.pending[cmid]
				if o == nil {
					continue // acked or rejected
				}
				live = append(live, cmid)
				fresh := o.sentOn != c
				retry := !o.retryAt.IsZero() && !now.Before(o.retryAt)
				stale := o.retryAt.IsZero() && now.Sub(o.lastSent) > resendAfter
				if !fresh && !retry && !stale {
					continue
				}
				if !o.lastSent.IsZero() {
					p.resends++
				}
				o.sentOn, o.lastSent, o.retryAt = c, now, time.Time{}
				due = append(due, o.send)
			}
			clear(p.queue[len(live):])
			p.queue = live
		}
		p.mu.Unlock()
		for _, s := range due {
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := c.WriteJSON(wctx, s)
			cancel()
			if err != nil {
				break // the connection is going; the next one resends
			}
		}
	}
}

// Send queues a message for to (a target spec); it is sent, and resent,
// until acked. cmid is its client_message_id and its correlation id.
func (p *Peer) Send(to, cmid, body string) {
	s := protocol.Send{Type: protocol.TypeSend, ID: cmid, TargetSpec: to, Priority: protocol.PriorityNow,
		Nonce: "bm9uY2U=", Ciphertext: body, ClientMessageID: cmid}
	p.mu.Lock()
	p.pending[cmid] = &outgoing{send: s}
	p.queue = append(p.queue, cmid)
	p.mu.Unlock()
	p.wake()
}

// Connected reports whether the peer has a live session now.
func (p *Peer) Connected() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn != nil
}

// Connects counts successful hellos (1 + reconnections).
func (p *Peer) Connects() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.connects
}

// Events returns the system events received so far.
func (p *Peer) Events() []protocol.Push {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]protocol.Push(nil), p.events...)
}

// ClearEvents forgets the system events received so far.
func (p *Peer) ClearEvents() {
	p.mu.Lock()
	p.events = nil
	p.mu.Unlock()
}

// WaitConnected waits until every peer has a session, or fails after
// timeout.
func WaitConnected(ctx context.Context, timeout time.Duration, peers ...*Peer) error {
	deadline := time.Now().Add(timeout)
	for {
		missing := 0
		for _, p := range peers {
			if !p.Connected() {
				missing++
			}
		}
		if missing == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d peers not connected after %s", missing, len(peers), timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
