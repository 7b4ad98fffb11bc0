package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// peer is one benchmark session: a connection, a reader that timestamps
// and accounts every frame, and an acker that writes client_acks so that
// the reader never blocks on the socket.
type peer struct {
	index int
	node  int // index of the target the peer is connected to
	conn  *client.Conn

	acks     chan ackItem            // reader → acker; closed by the reader
	flushReq chan chan struct{}      // flush → reader
	control  chan protocol.PeersList // reader → waitPresence
	closing  atomic.Bool             // set before we close the connection ourselves
	readDone chan struct{}
	ackDone  chan struct{}

	writeErrs atomic.Int64
}

// ackItem is a client_ack to write, or a flush marker (done closed once
// every earlier ack was written).
type ackItem struct {
	messageID string
	done      chan struct{}
}

// ackBuffer bounds the client_acks waiting for the acker. When it is full
// the reader waits, and TCP pushes back on the broker: a real client
// would do the same.
const ackBuffer = 8192

// dialPeer connects and completes a signed hello announcing client_ack.
func dialPeer(ctx context.Context, index, node int, url string, id client.Identity) (*peer, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	_, err = c.Hello(ctx, id, client.HelloOptions{
		SessionID: fmt.Sprintf("meshbench-%d-%d", os.Getpid(), index), PID: int64(os.Getpid()),
		Cwd: "/meshbench", Hostname: host, Capabilities: []string{protocol.CapClientAck},
	})
	if err != nil {
		_ = c.CloseNow()
		return nil, fmt.Errorf("peer %d hello on %s: %w", index, url, err)
	}
	c.Untyped()
	return &peer{
		index: index, node: node, conn: c,
		acks: make(chan ackItem, ackBuffer), flushReq: make(chan chan struct{}),
		control: make(chan protocol.PeersList, 1), readDone: make(chan struct{}), ackDone: make(chan struct{}),
	}, nil
}

// inbound holds the fields of the broker frames the reader looks at.
// The reader parses each frame once, into this, type included (the
// connection is Untyped after the hello).
type inbound struct {
	Type       string `json:"type"`
	Subtype    string `json:"subtype"`
	ID         string `json:"id"`
	MessageID  string `json:"messageId"`
	Queued     bool   `json:"queued"`
	Error      string `json:"error"`
	Code       string `json:"code"`
	Nonce      string `json:"nonce"`
	Ciphertext string `json:"ciphertext"`
}

// run starts the reader and the acker.
func (p *peer) run(ctx context.Context, l *ledger) {
	go p.ackLoop(ctx)
	go p.readLoop(l)
}

func (p *peer) readLoop(l *ledger) {
	defer close(p.readDone)
	defer close(p.acks)
	frames := p.conn.Frames()
	for {
		select {
		case f, ok := <-frames:
			if !ok {
				if !p.closing.Load() {
					l.disconnected(closeReason(p.conn.Err()))
				}
				return
			}
			p.handle(l, f, l.now())
		case done := <-p.flushReq:
			p.acks <- ackItem{done: done}
		}
	}
}

func (p *peer) handle(l *ledger, f client.Frame, at int64) {
	var in inbound
	if err := json.Unmarshal(f.Raw, &in); err != nil {
		l.errorFrame("undecodable_frame")
		return
	}
	if f.Type != "" {
		in.Type = f.Type // decoded by the connection before it went untyped
	}
	switch in.Type {
	case protocol.TypePush:
		if in.Subtype != "" {
			return // a system event; not asked for, but not ours to count
		}
		l.push(p.index, in.Nonce, in.Ciphertext, at)
		if in.MessageID != "" {
			p.acks <- ackItem{messageID: in.MessageID}
		}
	case protocol.TypeAck:
		l.ack(in.ID, at, in.Queued, in.Error)
	case protocol.TypeError:
		l.errorFrame(in.Code)
	case protocol.TypePeersList:
		var pl protocol.PeersList
		if json.Unmarshal(f.Raw, &pl) == nil {
			select {
			case p.control <- pl:
			default: // nobody is waiting for it any more
			}
		}
	}
}

func (p *peer) ackLoop(ctx context.Context) {
	defer close(p.ackDone)
	for it := range p.acks {
		if it.done != nil {
			close(it.done)
			continue
		}
		frame, _ := json.Marshal(protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: it.messageID})
		if err := p.conn.WriteRaw(ctx, frame); err != nil {
			p.writeErrs.Add(1)
		}
	}
}

// flush waits until every client_ack for the pushes read so far is
// written.
func (p *peer) flush(ctx context.Context) error {
	done := make(chan struct{})
	select {
	case p.flushReq <- done:
	case <-p.readDone:
		return nil // the connection is gone; nothing left to write
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-p.ackDone:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// close closes the connection normally and waits for the reader and the
// acker to finish.
func (p *peer) close() {
	p.closing.Store(true)
	_ = p.conn.Close()
	<-p.readDone
	<-p.ackDone
}

// send writes the peer's messages: at once, back to back (pipelined, not
// waiting for acks), or each at its intended time when the workload is
// scheduled. A message that cannot be written is accounted as unsent,
// and so is every later one of this peer.
func (p *peer) send(ctx context.Context, l *ledger, msgs []int32) error {
	w := l.w
	var timer *time.Timer
	if w.scheduled {
		timer = time.NewTimer(time.Hour)
		defer timer.Stop()
	}
	for k, i := range msgs {
		if w.scheduled {
			if d := time.Duration(l.intendedAt(i) - l.now()); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-ctx.Done():
				}
			}
		}
		if ctx.Err() != nil {
			p.abandon(l, msgs[k:])
			return ctx.Err()
		}
		l.markSent(i, l.now())
		if err := p.conn.WriteRaw(ctx, w.frames[i]); err != nil {
			p.abandon(l, msgs[k:])
			return fmt.Errorf("peer %d: write: %w", p.index, err)
		}
	}
	return nil
}

func (p *peer) abandon(l *ledger, msgs []int32) {
	for _, i := range msgs {
		l.markUnsent(i)
	}
}

// listPeers asks the peer's node for the mesh's live sessions.
func (p *peer) listPeers(ctx context.Context, reqID string) (int, error) {
	if err := p.conn.WriteJSON(ctx, protocol.ListPeers{Type: protocol.TypeListPeers, ReqID: reqID}); err != nil {
		return 0, err
	}
	for {
		select {
		case pl := <-p.control:
			if pl.ReqID == reqID {
				return len(pl.Peers), nil
			}
		case <-p.readDone:
			return 0, fmt.Errorf("connection closed: %w", p.conn.Err())
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// closeReason names why the broker ended a connection.
func closeReason(err error) string {
	var ce *client.CloseError
	switch {
	case errors.As(err, &ce) && ce.Reason != "":
		return ce.Reason
	case errors.As(err, &ce):
		return "close " + strconv.Itoa(ce.Code)
	case err == nil:
		return "closed"
	}
	return "dropped"
}

// dialAll connects n peers, peer i to node i mod len(urls), with at most
// parallel dials in flight. On error every opened peer is closed.
func dialAll(ctx context.Context, urls []string, ids []client.Identity, parallel int) ([]*peer, error) {
	peers := make([]*peer, len(ids))
	errs := make([]error, len(ids))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range ids {
		node := i % len(urls)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			peers[i], errs[i] = dialPeer(ctx, i, node, urls[node], ids[i])
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, p := range peers {
			if p != nil {
				_ = p.conn.CloseNow()
			}
		}
		return nil, err
	}
	return peers, nil
}
