package wan

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// Peer is a measuring WebSocket client. It announces client_ack and
// system_events, acknowledges every push, and stamps every frame with the
// time it arrived, so that a scenario can wait for a frame and read when
// it came.
type Peer struct {
	ID client.Identity
	// Hello is from writing the hello to reading hello_ack; HelloAckAt is
	// when hello_ack arrived.
	Hello      time.Duration
	HelloAckAt time.Time
	PresenceID string

	conn   *client.Conn
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every frame; guarded by mu
	acks    map[string]stampedAck
	pushes  map[string][]time.Time // by client_message_id
	events  []Event
	err     error // why the connection ended
}

type stampedAck struct {
	protocol.Ack
	at time.Time
}

// Event is a system event as a peer received it.
type Event struct {
	Name string
	Data protocol.PeerEvent
	At   time.Time
}

// maxFrames bounds what a peer records; a scenario sends far fewer.
const maxFrames = 100000

// Connect dials url and completes a hello for id with sessionID.
func Connect(ctx context.Context, url string, id client.Identity, sessionID string) (*Peer, error) {
	conn, err := client.Dial(ctx, url, nil)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	ack, err := conn.Hello(ctx, id, client.HelloOptions{SessionID: sessionID,
		Capabilities: []string{protocol.CapClientAck, protocol.CapSystemEvents}})
	if err != nil {
		_ = conn.CloseNow()
		return nil, fmt.Errorf("hello: %w", err)
	}
	at := time.Now()
	rctx, cancel := context.WithCancel(context.Background())
	p := &Peer{ID: id, Hello: at.Sub(start), HelloAckAt: at, PresenceID: ack.PresenceID, conn: conn, cancel: cancel,
		done: make(chan struct{}), changed: make(chan struct{}), acks: map[string]stampedAck{}, pushes: map[string][]time.Time{}}
	go p.read(rctx)
	return p, nil
}

func (p *Peer) read(ctx context.Context) {
	defer close(p.done)
	for {
		f, err := p.conn.Next(ctx)
		at := time.Now()
		if err != nil {
			p.mu.Lock()
			p.err = err
			p.signal()
			p.mu.Unlock()
			return
		}
		switch f.Type {
		case protocol.TypeAck:
			var a protocol.Ack
			if f.Decode(&a) != nil {
				continue
			}
			p.mu.Lock()
			if _, ok := p.acks[a.ID]; !ok && len(p.acks) < maxFrames {
				p.acks[a.ID] = stampedAck{Ack: a, at: at}
			}
			p.signal()
			p.mu.Unlock()
		case protocol.TypePush:
			var m protocol.Push
			if f.Decode(&m) != nil {
				continue
			}
			if m.Subtype != "" {
				var ev protocol.PeerEvent
				_ = json.Unmarshal(m.EventData, &ev)
				p.mu.Lock()
				if len(p.events) < maxFrames {
					p.events = append(p.events, Event{Name: m.Event, Data: ev, At: at})
				}
				p.signal()
				p.mu.Unlock()
				continue
			}
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_ = p.conn.WriteJSON(wctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: m.MessageID})
			cancel()
			p.mu.Lock()
			if len(p.pushes) < maxFrames {
				p.pushes[m.ClientMessageID] = append(p.pushes[m.ClientMessageID], at)
			}
			p.signal()
			p.mu.Unlock()
		}
	}
}

// signal wakes waiters; p.mu is held.
func (p *Peer) signal() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// wait waits until cond (called with p.mu held) holds, the connection
// ends, or timeout passes.
func (p *Peer) wait(timeout time.Duration, cond func() bool) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		p.mu.Lock()
		ok, ended, ch := cond(), p.err != nil, p.changed
		p.mu.Unlock()
		if ok {
			return true
		}
		if ended {
			return false
		}
		select {
		case <-ch:
		case <-timer.C:
			return false
		}
	}
}

// Send writes a send of body to target (priority now), correlated and
// deduplicated by cmid, and returns when it was written.
func (p *Peer) Send(ctx context.Context, target, cmid, body string) (time.Time, error) {
	at := time.Now()
	err := p.conn.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: cmid, TargetSpec: target,
		Priority: protocol.PriorityNow, Nonce: "bm9uY2U=", Ciphertext: body, ClientMessageID: cmid})
	return at, err
}

// SetStatus writes a manual set_status and returns when it was written.
func (p *Peer) SetStatus(ctx context.Context, status string) (time.Time, error) {
	at := time.Now()
	return at, p.conn.WriteJSON(ctx, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: status})
}

// WaitAck waits for the ack of cmid.
func (p *Peer) WaitAck(cmid string, timeout time.Duration) (protocol.Ack, time.Time, bool) {
	var a stampedAck
	ok := p.wait(timeout, func() bool {
		var found bool
		a, found = p.acks[cmid]
		return found
	})
	return a.Ack, a.at, ok
}

// WaitPush waits for the first push of cmid.
func (p *Peer) WaitPush(cmid string, timeout time.Duration) (time.Time, bool) {
	var at time.Time
	ok := p.wait(timeout, func() bool {
		ts := p.pushes[cmid]
		if len(ts) > 0 {
			at = ts[0]
		}
		return len(ts) > 0
	})
	return at, ok
}

// Pushes counts the pushes of cmid received so far.
func (p *Peer) Pushes(cmid string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pushes[cmid])
}

// WaitEvent waits for a system event that match accepts, among those
// received after since.
func (p *Peer) WaitEvent(since time.Time, timeout time.Duration, match func(Event) bool) (Event, bool) {
	var ev Event
	ok := p.wait(timeout, func() bool {
		for _, e := range p.events {
			if !e.At.Before(since) && match(e) {
				ev = e
				return true
			}
		}
		return false
	})
	return ev, ok
}

// Close drops the connection and waits for the reader.
func (p *Peer) Close() {
	_ = p.conn.CloseNow()
	p.cancel()
	<-p.done
}
