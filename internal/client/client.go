package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/sanitize"
)

// Options configure a Client. Zero values are the documented defaults.
type Options struct {
	Identity Identity
	// URLs are the broker WebSocket URLs (ws://host:port/ws), tried in turn:
	// after a failure or a dropped connection the next one is tried first.
	URLs []string
	// MeshKey seals and opens broadcast ("*") and group ("@name")
	// messages. Nil: such messages cannot be sent or read.
	MeshKey *[e2e.MeshKeySize]byte

	// SessionID names this session; reconnections reuse it, so the broker
	// reattaches the same presence. Zero: a random id.
	SessionID string
	PID       int64
	Cwd       string // zero: "/"
	Hostname  string
	Groups    []string
	// Ephemeral marks a short-lived connection (a CLI command): the broker
	// hides it from peers and announces no join or leave for it.
	Ephemeral bool
	// SendOnly asks the broker never to hand this connection a message
	// (capability send_only): a command that only sends or lists must not
	// take what waits for the member's real session. It implies
	// Ephemeral.
	SendOnly bool

	// Outbox keeps sends until acked; nil: in memory (lost on exit).
	Outbox Outbox
	// Inbox records received messages and dedupes redeliveries; nil: an
	// in-memory dedupe window.
	Inbox Inbox

	// OnMessage is called once per new message, after Inbox.Record and
	// before the client_ack, on the connection's read goroutine: it must
	// not block for long.
	OnMessage func(Message)
	// OnEvent is called for each system event (peer joined, left, status).
	OnEvent func(Event)
	// OnConnect is called after each successful hello.
	OnConnect func(ConnInfo)

	Backoff Backoff
	// DialTimeout bounds one connection attempt (dial and hello); zero 10s.
	DialTimeout time.Duration
	// AckTimeout bounds the wait for a send's ack, after which the
	// connection is considered dead and replaced; zero 20s.
	AckTimeout time.Duration
	// PingInterval is how often an idle connection is checked; zero 30s.
	PingInterval time.Duration
	// GiveUpAfter stops the client after this many consecutive failed
	// connection attempts (a one-shot command fails fast). Zero: never.
	GiveUpAfter int

	HTTPClient *http.Client
	Logger     *slog.Logger
}

// ConnInfo describes an established connection.
type ConnInfo struct {
	URL        string
	Node       string
	PresenceID string
	Reattached bool
}

// Message is a received, decrypted message.
type Message struct {
	ID              string    `json:"id"` // the broker's messageId
	MeshID          string    `json:"meshId"`
	From            string    `json:"from"` // sender pubkey
	FromName        string    `json:"fromName"`
	FromMemberID    string    `json:"fromMemberId,omitempty"`
	Target          string    `json:"target"`
	Kind            string    `json:"kind"` // direct, broadcast or group
	Priority        string    `json:"priority"`
	Text            string    `json:"text"`
	CreatedAt       string    `json:"createdAt"`
	ReceivedAt      time.Time `json:"receivedAt"`
	ClientMessageID string    `json:"clientMessageId,omitempty"`
	// DecryptError is set when the envelope could not be opened (forged,
	// corrupted, or sealed with a key this client lacks); Text is empty.
	DecryptError string `json:"decryptError,omitempty"`
}

// Event is a system event: a peer joined, left or changed status.
type Event struct {
	Name string             `json:"event"` // peer_joined, peer_left or peer_status
	Peer protocol.PeerEvent `json:"peer"`
	At   string             `json:"at,omitempty"`
}

// SendResult is the broker's answer to a send.
type SendResult struct {
	ClientMessageID string `json:"clientMessageId"`
	MessageID       string `json:"messageId"`
	Duplicate       bool   `json:"duplicate,omitempty"`
}

// Errors.
var (
	ErrNotConnected = errors.New("not connected to the broker")
	ErrClientClosed = errors.New("client closed")
	// ErrNotAcked: the message is in the outbox but the broker has not
	// acked it yet; it will be sent when a connection is available.
	ErrNotAcked = errors.New("message kept in the outbox: the broker has not acked it yet")
	// ErrReplaced: another connection took over this session id.
	ErrReplaced = errors.New("another connection took over this session")
)

// SendError is a send the broker rejected for good.
type SendError struct {
	ClientMessageID string
	Code            string // unknown_recipient, no_recipients, too_large, malformed
}

func (e *SendError) Error() string {
	switch e.Code {
	case protocol.CodeUnknownRecipient:
		return "the broker rejected the message: the recipient is not a member of the mesh"
	case protocol.CodeNoRecipients:
		return "the broker rejected the message: nobody is addressed (no other member, or nobody in that group)"
	case protocol.CodeTooLarge:
		return "the broker rejected the message: too large"
	}
	return "the broker rejected the message: " + e.Code
}

// AttemptError is one failed connection attempt.
type AttemptError struct {
	URL string
	Err error
}

// UnreachableError reports that no broker URL could be reached.
type UnreachableError struct {
	Attempts []AttemptError
}

func (e *UnreachableError) Error() string {
	var b strings.Builder
	b.WriteString("cannot reach the broker")
	seen := map[string]bool{}
	for i := len(e.Attempts) - 1; i >= 0; i-- { // latest error per URL
		a := e.Attempts[i]
		if seen[a.URL] {
			continue
		}
		seen[a.URL] = true
		fmt.Fprintf(&b, "; %s: %v", a.URL, a.Err)
	}
	return b.String()
}

func (e *UnreachableError) Unwrap() []error {
	out := make([]error, len(e.Attempts))
	for i, a := range e.Attempts {
		out[i] = a.Err
	}
	return out
}

// Client is a long-lived broker session: it connects to one of its URLs,
// reconnects with backoff when the connection drops, sends from a
// persistent outbox with idempotency keys, acknowledges pushes after they
// are recorded, and dedupes redeliveries.
type Client struct {
	o      Options
	sealer *sealer
	logger *slog.Logger
	kick   chan struct{} // the outbox has new entries

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	start  sync.Once
	reqSeq atomic.Int64

	mu       sync.Mutex
	cur      *liveConn              // nil while disconnected
	ready    chan struct{}          // closed while connected
	pending  map[string]*Pending    // by client message id
	requests map[string]chan []byte // by _reqId
	attempts []AttemptError         // failures since the last success
	runErr   error                  // why Run stopped
	groups   []string               // sent in every hello
	want     desired                // status and summary to restore
	urlNext  int                    // index of the next URL to try
	closed   bool                   // Close was called
	stopped  bool                   // run has returned
}

// liveConn is the current connection.
type liveConn struct {
	conn *Conn
	info ConnInfo
	acks chan protocol.Ack
	gone chan struct{}
}

// desired is the status and summary the client asked for, restored on a
// fresh presence.
type desired struct {
	status, source, summary string
	hasStatus, hasSummary   bool
	// unsent: a change was made while no connection could carry it, so
	// even a reattached presence must be told.
	unsent bool
}

// New validates o and returns a client; call Start to connect.
func New(o Options) (*Client, error) {
	if o.Identity.Priv == nil || o.Identity.MeshID == "" || o.Identity.MemberID == "" {
		return nil, errors.New("client: identity needs a key, a mesh id and a member id")
	}
	if len(o.URLs) == 0 {
		return nil, errors.New("client: no broker URL")
	}
	if o.SessionID == "" {
		var b [12]byte
		rand.Read(b[:])
		o.SessionID = "cm-" + hex.EncodeToString(b[:])
	}
	if o.Outbox == nil {
		o.Outbox = NewMemoryOutbox()
	}
	if o.Inbox == nil {
		o.Inbox = NewMemoryInbox()
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 20 * time.Second
	}
	if o.PingInterval <= 0 {
		o.PingInterval = 30 * time.Second
	}
	logger := o.Logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{
		o: o, sealer: newSealer(o.Identity.Priv, o.MeshKey), logger: logger.With("session_id", o.SessionID),
		kick: make(chan struct{}, 1), ctx: ctx, cancel: cancel, done: make(chan struct{}),
		ready: make(chan struct{}), pending: map[string]*Pending{}, requests: map[string]chan []byte{},
		groups: slices.Clone(o.Groups),
	}, nil
}

// SessionID is the session id sent in every hello.
func (c *Client) SessionID() string { return c.o.SessionID }

// Start connects in the background and keeps reconnecting until Close, a
// permanent rejection, or GiveUpAfter failed attempts.
func (c *Client) Start() {
	c.start.Do(func() { go c.run() })
}

// Close disconnects (acknowledged pushes stay acknowledged; unacked ones
// are redelivered by the broker) and waits for the client to stop. Entries
// still in the outbox stay there.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.start.Do(func() { close(c.done) }) // never started
	<-c.done
	return nil
}

// Done is closed when the client has stopped.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the client stopped: nil after Close, otherwise a permanent
// rejection (*HelloError, ErrReplaced, a *CloseError for a revoked member)
// or an *UnreachableError.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.runErr
}

// Info describes the current connection; ok is false while disconnected.
func (c *Client) Info() (ConnInfo, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return ConnInfo{}, false
	}
	return c.cur.info, true
}

// WaitReady waits until the client is connected. It fails when the client
// stops, or when ctx ends first; then the error says what the connection
// attempts ran into.
func (c *Client) WaitReady(ctx context.Context) error {
	for {
		c.mu.Lock()
		ready := c.ready
		c.mu.Unlock()
		select {
		case <-ready:
			return nil
		case <-c.done:
			if err := c.Err(); err != nil {
				return err
			}
			return ErrClientClosed
		case <-ctx.Done():
			c.mu.Lock()
			attempts := slices.Clone(c.attempts)
			c.mu.Unlock()
			if len(attempts) > 0 {
				return &UnreachableError{Attempts: attempts}
			}
			return fmt.Errorf("%w: %w", ErrNotConnected, ctx.Err())
		}
	}
}

func (c *Client) run() {
	defer close(c.done)
	err := c.loop()
	c.mu.Lock()
	c.runErr, c.stopped = err, true
	for _, p := range c.pending {
		p.finish(SendResult{}, fmt.Errorf("%w (%s)", ErrNotAcked, stopReason(err)))
	}
	clear(c.pending)
	c.mu.Unlock()
	if err != nil {
		c.logger.Warn("client stopped", "err", err)
	}
}

func stopReason(err error) string {
	if err == nil {
		return "client closed"
	}
	return err.Error()
}

// loop connects, serves and reconnects until the client closes or a
// permanent error occurs.
func (c *Client) loop() error {
	failures := 0
	for {
		if c.ctx.Err() != nil {
			return nil
		}
		c.mu.Lock()
		url := c.o.URLs[c.urlNext%len(c.o.URLs)]
		c.mu.Unlock()
		lc, err := c.connect(url)
		if err != nil {
			if c.ctx.Err() != nil {
				return nil
			}
			if permanent(err) {
				return err
			}
			failures++
			c.mu.Lock()
			c.urlNext++
			c.attempts = append(c.attempts, AttemptError{URL: url, Err: err})
			if len(c.attempts) > 32 {
				c.attempts = c.attempts[len(c.attempts)-32:]
			}
			attempts := slices.Clone(c.attempts)
			c.mu.Unlock()
			c.logger.Info("connect failed", "url", url, "err", err, "failures", failures)
			if c.o.GiveUpAfter > 0 && failures >= c.o.GiveUpAfter {
				return &UnreachableError{Attempts: attempts}
			}
			if !c.waitRetry(c.retryDelay(err, failures), outage(err)) {
				return nil
			}
			continue
		}
		c.mu.Lock()
		c.attempts = nil
		c.mu.Unlock()
		started := time.Now()
		err = c.serve(lc)
		if c.ctx.Err() != nil {
			return nil
		}
		if permanent(err) {
			return err
		}
		c.logger.Info("connection lost; reconnecting", "url", url, "err", err)
		// A connection that died young counts as a failure, so a broker
		// that accepts and then drops us is not hammered.
		if time.Since(started) < 10*time.Second {
			failures++
		} else {
			failures = 1
		}
		c.mu.Lock()
		c.urlNext++ // the node we were on may be gone: try the next first
		c.mu.Unlock()
		if !c.waitRetry(c.o.Backoff.Delay(failures), true) {
			return nil
		}
	}
}

// outage reports failures that mean the broker is not there (refused,
// reset, timed out, a balancer's 502/503/504): those end when it is back,
// which /health tells. A broker that answered and refused (a hello
// rejection such as capacity, 429) is not waited out early.
func outage(err error) bool {
	var hello *HelloError
	if errors.As(err, &hello) {
		return false
	}
	var he *HandshakeError
	if errors.As(err, &he) {
		return he.Status == http.StatusBadGateway || he.Status == http.StatusServiceUnavailable || he.Status == http.StatusGatewayTimeout
	}
	return true
}

// retryDelay is the wait after a failed attempt: what the server asked
// for (Retry-After), almost none when the node was draining (another one
// takes the session), else the backoff.
func (c *Client) retryDelay(err error, failures int) time.Duration {
	var he *HandshakeError
	if errors.As(err, &he) && he.RetryAfter > 0 {
		return min(he.RetryAfter, time.Minute)
	}
	var hello *HelloError
	if errors.As(err, &hello) && hello.Code == protocol.ReasonDraining {
		return c.o.Backoff.Delay(1)
	}
	return c.o.Backoff.Delay(failures)
}

// Health probing while waiting to reconnect: after a full restart every
// client has backed off for up to Backoff.Max, while the cluster is back
// within seconds. A wait longer than healthProbeEvery is cut short as soon
// as a broker URL answers /health with 200, plus a random spread so that
// the clients of a restarted cluster do not all come back at once.
const (
	healthProbeEvery  = time.Second
	healthProbeSpread = 500 * time.Millisecond
)

// waitRetry waits d, or, with probe, until a broker answers /health; it
// reports false when the client is closing.
func (c *Client) waitRetry(d time.Duration, probe bool) bool {
	if !probe || d <= 2*healthProbeEvery {
		return c.sleep(d)
	}
	deadline := time.Now().Add(d)
	for time.Until(deadline) > healthProbeEvery {
		if !c.sleep(healthProbeEvery) {
			return false
		}
		if i, ok := c.probeHealth(); ok {
			c.mu.Lock()
			c.urlNext = i
			c.mu.Unlock()
			c.logger.Info("broker answers /health; reconnecting now", "url", c.o.URLs[i])
			return c.sleep(mrand.N(healthProbeSpread))
		}
	}
	return c.sleep(time.Until(deadline))
}

// probeHealth asks each URL's /health (briefly) and returns the first that
// answers 200.
func (c *Client) probeHealth() (int, bool) {
	hc := c.o.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	c.mu.Lock()
	first := c.urlNext
	c.mu.Unlock()
	for k := range c.o.URLs {
		i := (first + k) % len(c.o.URLs)
		base, err := HTTPBase(c.o.URLs[i])
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(c.ctx, healthProbeEvery/2)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/health", nil)
		if err != nil {
			cancel()
			continue
		}
		resp, err := hc.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
		}
		cancel()
		if err == nil && resp.StatusCode == http.StatusOK {
			return i, true
		}
	}
	return 0, false
}

func (c *Client) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// permanent reports errors that reconnecting cannot fix.
func permanent(err error) bool {
	var he *HelloError
	if errors.As(err, &he) {
		switch he.Code {
		case protocol.ReasonUnauthorized, protocol.ReasonBadSignature, protocol.ReasonMalformed, protocol.ReasonTimestampSkew:
			return true
		}
		return false
	}
	var ce *CloseError
	if errors.As(err, &ce) && ce.Code == protocol.ClosePolicy && ce.Reason == protocol.CloseReasonRevoked {
		return true
	}
	return errors.Is(err, ErrReplaced)
}

// connect dials url and completes a hello.
func (c *Client) connect(url string) (*liveConn, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.o.DialTimeout)
	defer cancel()
	conn, err := Dial(ctx, url, &DialOptions{HTTPClient: c.o.HTTPClient})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	groups := slices.Clone(c.groups)
	c.mu.Unlock()
	caps := []string{protocol.CapClientAck, protocol.CapSystemEvents}
	if c.o.Ephemeral || c.o.SendOnly {
		caps = append(caps, protocol.CapEphemeral)
	}
	if c.o.SendOnly {
		caps = append(caps, protocol.CapSendOnly)
	}
	ack, err := conn.Hello(ctx, c.o.Identity, HelloOptions{
		SessionID: c.o.SessionID, PID: c.o.PID, Cwd: c.o.Cwd, Hostname: c.o.Hostname, Groups: groups,
		Capabilities: caps,
	})
	if err != nil {
		_ = conn.CloseNow()
		return nil, err
	}
	return &liveConn{
		conn: conn,
		info: ConnInfo{URL: url, Node: ack.Node, PresenceID: ack.PresenceID, Reattached: ack.Reattached},
		acks: make(chan protocol.Ack, 16),
		gone: make(chan struct{}),
	}, nil
}

// serve runs one connection until it ends.
func (c *Client) serve(lc *liveConn) error {
	ctx, cancel := context.WithCancel(c.ctx)
	c.mu.Lock()
	c.cur = lc
	close(c.ready)
	restore := c.want
	c.want.unsent = false
	c.mu.Unlock()
	c.logger.Info("connected", "url", lc.info.URL, "node", lc.info.Node, "presence_id", lc.info.PresenceID,
		"reattached", lc.info.Reattached)
	if !lc.info.Reattached || restore.unsent {
		c.restore(ctx, lc.conn, restore)
	}
	if c.o.OnConnect != nil {
		c.o.OnConnect(lc.info)
	}

	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := c.sendLoop(ctx, lc); err != nil && ctx.Err() == nil {
			c.logger.Info("send loop ended; dropping the connection", "err", err)
			_ = lc.conn.CloseNow()
		}
	}()
	go func() {
		defer wg.Done()
		c.pingLoop(ctx, lc.conn)
	}()
	err := c.readLoop(ctx, lc)
	if c.ctx.Err() != nil {
		_ = lc.conn.Close() // orderly: the broker releases unacked pushes at once
	} else {
		_ = lc.conn.CloseNow()
	}
	cancel()
	wg.Wait()

	c.mu.Lock()
	c.cur = nil
	c.ready = make(chan struct{})
	close(lc.gone)
	c.mu.Unlock()
	return err
}

func (c *Client) restore(ctx context.Context, conn *Conn, d desired) {
	if d.hasStatus {
		if err := conn.WriteJSON(ctx, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: d.status, Source: d.source}); err != nil {
			c.logger.Debug("restore status", "err", err)
		}
	}
	if d.hasSummary {
		if err := conn.WriteJSON(ctx, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: d.summary}); err != nil {
			c.logger.Debug("restore summary", "err", err)
		}
	}
}

func (c *Client) pingLoop(ctx context.Context, conn *Conn) {
	t := time.NewTicker(c.o.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, c.o.PingInterval/2)
		err := conn.Ping(pctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			c.logger.Info("ping failed; dropping the connection", "err", err)
			_ = conn.CloseNow()
			return
		}
	}
}

// readLoop dispatches frames until the connection ends and returns why.
func (c *Client) readLoop(ctx context.Context, lc *liveConn) error {
	for {
		f, err := lc.conn.Next(ctx)
		if err != nil {
			var ce *CloseError
			if errors.As(err, &ce) && ce.Code == protocol.CloseNormal && ce.Reason == protocol.CloseReasonReplaced {
				return ErrReplaced
			}
			return err
		}
		switch f.Type {
		case protocol.TypeAck:
			var a protocol.Ack
			if err := f.Decode(&a); err != nil {
				c.logger.Warn("bad ack frame", "err", err)
				continue
			}
			select {
			case lc.acks <- a:
			default:
				c.logger.Warn("unexpected ack dropped", "id", a.ID)
			}
		case protocol.TypePush:
			c.handlePush(ctx, lc.conn, f)
		case protocol.TypeError:
			var e protocol.ErrorFrame
			_ = f.Decode(&e)
			if !c.answer(e.ReqID, f.Raw) {
				c.logger.Warn("broker error", "code", e.Code, "message", e.Message)
			}
		default:
			var env struct {
				ReqID string `json:"_reqId"`
			}
			_ = f.Decode(&env)
			if !c.answer(env.ReqID, f.Raw) {
				c.logger.Debug("frame ignored", "type", f.Type)
			}
		}
	}
}

// answer hands a reply to the request waiting for reqID.
func (c *Client) answer(reqID string, raw []byte) bool {
	if reqID == "" {
		return false
	}
	c.mu.Lock()
	ch := c.requests[reqID]
	delete(c.requests, reqID)
	c.mu.Unlock()
	if ch == nil {
		return false
	}
	ch <- raw // buffered, one reply per request
	return true
}

func (c *Client) handlePush(ctx context.Context, conn *Conn, f Frame) {
	var p protocol.Push
	if err := f.Decode(&p); err != nil {
		c.logger.Warn("bad push frame", "err", err)
		return
	}
	if p.Subtype == protocol.SubtypeSystem {
		if c.o.OnEvent != nil {
			ev := Event{Name: p.Event, At: p.CreatedAt}
			_ = json.Unmarshal(p.EventData, &ev.Peer)
			c.o.OnEvent(ev)
		}
		return
	}
	if p.MessageID == "" {
		c.logger.Warn("push without messageId ignored")
		return
	}
	m := Message{
		ID: p.MessageID, MeshID: p.MeshID, From: strings.ToLower(p.SenderPubkey), FromName: p.SenderName,
		FromMemberID: p.SenderMemberID, Target: p.TargetSpec, Kind: kindOf(p.TargetSpec), Priority: p.Priority,
		CreatedAt: p.CreatedAt, ReceivedAt: time.Now().UTC(), ClientMessageID: p.ClientMessageID,
	}
	if m.Priority == "" {
		m.Priority = protocol.PriorityNext
	}
	if text, err := c.sealer.open(&p); err != nil {
		m.DecryptError = err.Error()
		c.logger.Warn("cannot decrypt message", "message_id", p.MessageID, "from", p.SenderPubkey, "err", err)
	} else {
		m.Text = string(text)
	}
	isNew, err := c.o.Inbox.Record(m)
	if err != nil {
		// Not acked: the broker redelivers it once the lease runs out.
		c.logger.Error("cannot record message; leaving it unacked", "message_id", p.MessageID, "err", err)
		return
	}
	if isNew && c.o.OnMessage != nil {
		c.o.OnMessage(m)
	}
	if err := conn.WriteJSON(ctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID}); err != nil {
		c.logger.Debug("client_ack not sent; the message will be redelivered and deduped", "err", err)
	}
}

// Pending is a message accepted into the outbox.
type Pending struct {
	ClientMessageID string
	done            chan struct{}
	res             SendResult
	err             error

	// entry is what was stored; stored is set (under Client.mu) once the
	// outbox holds it. The client sends its own stored entries even when
	// the outbox no longer lists them: another process sharing the outbox
	// may have sent and removed one, and only the broker's (deduplicated)
	// answer to a resend tells this waiter the outcome.
	entry  OutboxEntry
	stored bool
}

func (p *Pending) finish(res SendResult, err error) {
	p.res, p.err = res, err
	close(p.done)
}

// Done is closed once the outcome is known.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Wait returns the broker's answer, or an error wrapping ErrNotAcked when
// ctx ends first (the message stays in the outbox and is sent later).
func (p *Pending) Wait(ctx context.Context) (SendResult, error) {
	select {
	case <-p.done:
		return p.res, p.err
	case <-ctx.Done():
		return SendResult{}, fmt.Errorf("%w (client message id %s)", ErrNotAcked, p.ClientMessageID)
	}
}

// Enqueue seals text for targetSpec (a 64-hex pubkey, "*" or "@group") and
// stores it in the outbox. Once Enqueue returns the message is accepted: it
// is sent when a connection is available, and resent with the same
// idempotency key until the broker acks it.
func (c *Client) Enqueue(targetSpec, text, priority string) (*Pending, error) {
	return c.EnqueueTo(targetSpec, text, priority, "")
}

// EnqueueTo is Enqueue recording what the user addressed (a name) for
// display.
func (c *Client) EnqueueTo(targetSpec, text, priority, to string) (*Pending, error) {
	if priority == "" {
		priority = protocol.PriorityNext
	}
	if _, ok := protocol.PriorityRank(priority); !ok {
		return nil, fmt.Errorf("priority %q must be now, next or low", priority)
	}
	kind, arg := protocol.ParseTarget(targetSpec)
	if kind == protocol.TargetInvalid {
		return nil, fmt.Errorf("target %q must be a 64-hex pubkey, * or @group", targetSpec)
	}
	if kind == protocol.TargetPubkey {
		targetSpec = arg
	}
	nonce, ct, err := c.sealer.seal(targetSpec, []byte(text))
	if err != nil {
		return nil, err
	}
	var b [16]byte
	rand.Read(b[:])
	e := OutboxEntry{
		ClientMessageID: "cm-" + hex.EncodeToString(b[:]), TargetSpec: targetSpec, Priority: priority,
		Nonce: nonce, Ciphertext: ct, To: to, Text: text, CreatedAt: time.Now().UTC(),
	}
	p := &Pending{ClientMessageID: e.ClientMessageID, done: make(chan struct{}), entry: e}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClientClosed
	}
	// Registered before the entry exists, so its ack cannot be missed.
	c.pending[e.ClientMessageID] = p
	stopped := c.stopped
	c.mu.Unlock()
	if err := c.o.Outbox.Add(e); err != nil {
		c.mu.Lock()
		delete(c.pending, e.ClientMessageID)
		c.mu.Unlock()
		return nil, fmt.Errorf("saving to the outbox: %w", err)
	}
	c.mu.Lock()
	p.stored = true
	c.mu.Unlock()
	if stopped {
		// Accepted into the outbox, but this client will not send it: a
		// later client (another command) will.
		c.mu.Lock()
		delete(c.pending, e.ClientMessageID)
		c.mu.Unlock()
		p.finish(SendResult{ClientMessageID: e.ClientMessageID}, fmt.Errorf("%w (%s)", ErrNotAcked, stopReason(c.Err())))
		return p, nil
	}
	c.Flush()
	return p, nil
}

// Send is Enqueue followed by Wait.
func (c *Client) Send(ctx context.Context, targetSpec, text, priority string) (SendResult, error) {
	p, err := c.Enqueue(targetSpec, text, priority)
	if err != nil {
		return SendResult{}, err
	}
	return p.Wait(ctx)
}

// Flush asks the client to look at the outbox now (for entries another
// process added).
func (c *Client) Flush() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// outboxRescan is how often the outbox is re-read without a kick, to pick
// up entries other processes left behind.
const outboxRescan = 10 * time.Second

// sendLoop sends outbox entries one at a time, in order, each waiting for
// its ack. It returns when the connection should be dropped.
func (c *Client) sendLoop(ctx context.Context, lc *liveConn) error {
	tick := time.NewTicker(outboxRescan)
	defer tick.Stop()
	retries := 0
	for {
		entries, err := c.o.Outbox.Pending()
		if err != nil {
			c.logger.Error("reading the outbox", "err", err)
		}
		entries = c.withOwn(entries)
		deferred := false
		for _, e := range entries {
			res, code, err := c.sendOne(ctx, lc, e)
			if err != nil {
				return err
			}
			if code == "" || !transientCode(code) {
				retries = 0
				c.complete(e.ClientMessageID, res, code)
				continue
			}
			// Rate limited or Postgres away: retry this entry (and keep
			// the order) after a pause.
			retries++
			deferred = true
			c.logger.Info("send deferred", "code", code, "client_message_id", e.ClientMessageID)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(Backoff{Min: 200 * time.Millisecond, Max: 5 * time.Second}.Delay(retries)):
			}
			break
		}
		if deferred {
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.kick:
		case <-tick.C:
		}
	}
}

// withOwn appends to the outbox's entries this client's own waiting sends
// that it no longer lists (another process sharing the outbox sent and
// removed them, or reading it failed), oldest first. The broker answers
// their resend from its idempotency record, so nothing is delivered twice
// and the waiter learns the messageId.
func (c *Client) withOwn(listed []OutboxEntry) []OutboxEntry {
	seen := make(map[string]struct{}, len(listed))
	for _, e := range listed {
		seen[e.ClientMessageID] = struct{}{}
	}
	var own []OutboxEntry
	c.mu.Lock()
	for id, p := range c.pending {
		if _, ok := seen[id]; !ok && p.stored {
			own = append(own, p.entry)
		}
	}
	c.mu.Unlock()
	slices.SortFunc(own, func(a, b OutboxEntry) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return append(listed, own...)
}

func transientCode(code string) bool {
	switch code {
	case protocol.CodeRateLimited, protocol.CodeUnavailable, protocol.CodeInternal:
		return true
	}
	return false
}

// sendOne writes one entry and waits for its ack. code is the ack's error
// ("" when queued); err means the connection is unusable.
func (c *Client) sendOne(ctx context.Context, lc *liveConn, e OutboxEntry) (SendResult, string, error) {
	frame := protocol.Send{
		Type: protocol.TypeSend, ID: e.ClientMessageID, TargetSpec: e.TargetSpec, Priority: e.Priority,
		Nonce: e.Nonce, Ciphertext: e.Ciphertext, ClientMessageID: e.ClientMessageID,
	}
	if err := lc.conn.WriteJSON(ctx, frame); err != nil {
		return SendResult{}, "", fmt.Errorf("write send: %w", err)
	}
	timer := time.NewTimer(c.o.AckTimeout)
	defer timer.Stop()
	for {
		select {
		case a := <-lc.acks:
			if a.ID != e.ClientMessageID {
				continue // a late ack of an earlier attempt
			}
			if !a.Queued {
				return SendResult{}, orDefault(a.Error, protocol.CodeInternal), nil
			}
			return SendResult{ClientMessageID: e.ClientMessageID, MessageID: a.MessageID, Duplicate: a.Duplicate}, "", nil
		case <-timer.C:
			return SendResult{}, "", fmt.Errorf("no ack within %s", c.o.AckTimeout)
		case <-ctx.Done():
			return SendResult{}, "", ctx.Err()
		}
	}
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// complete records an entry's outcome and wakes its waiter.
func (c *Client) complete(id string, res SendResult, code string) {
	var err error
	if code == "" {
		err = c.o.Outbox.Done(id)
	} else {
		err = c.o.Outbox.Fail(id, code)
	}
	if err != nil {
		// The entry stays and is resent; the broker dedupes it.
		c.logger.Error("updating the outbox", "client_message_id", id, "err", err)
	}
	c.mu.Lock()
	p := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if p == nil {
		return
	}
	if code != "" {
		p.finish(SendResult{ClientMessageID: id}, &SendError{ClientMessageID: id, Code: code})
		return
	}
	p.finish(res, nil)
}

// request sends a frame carrying a fresh _reqId and waits for the reply.
func (c *Client) request(ctx context.Context, build func(reqID string) any) ([]byte, error) {
	id := "r" + strconv.FormatInt(c.reqSeq.Add(1), 10)
	ch := make(chan []byte, 1)
	c.mu.Lock()
	lc := c.cur
	if lc == nil {
		c.mu.Unlock()
		return nil, ErrNotConnected
	}
	c.requests[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.requests, id)
		c.mu.Unlock()
	}()
	if err := lc.conn.WriteJSON(ctx, build(id)); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotConnected, err)
	}
	select {
	case raw := <-ch:
		var e protocol.ErrorFrame
		if json.Unmarshal(raw, &e) == nil && e.Type == protocol.TypeError {
			return nil, &RequestError{Code: e.Code, Message: e.Message}
		}
		return raw, nil
	case <-lc.gone:
		return nil, fmt.Errorf("%w: the connection dropped", ErrNotConnected)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ListPeers returns every live session of the mesh, cluster-wide.
func (c *Client) ListPeers(ctx context.Context) ([]protocol.Peer, error) {
	raw, err := c.request(ctx, func(id string) any { return protocol.ListPeers{Type: protocol.TypeListPeers, ReqID: id} })
	if err != nil {
		return nil, err
	}
	var pl protocol.PeersList
	if err := json.Unmarshal(raw, &pl); err != nil {
		return nil, fmt.Errorf("decode peers_list: %w", err)
	}
	return pl.Peers, nil
}

// RequestError is a request the broker answered with an error frame.
type RequestError struct {
	Code    string
	Message string
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("broker error %s: %s", sanitize.Clip(e.Code, 64), sanitize.Clip(e.Message, 200))
}

// ErrUnsupported: the broker does not know the request (an older broker).
var ErrUnsupported = errors.New("the broker does not support this request")

// maxMemberPages bounds a listing: 200 pages of up to 500 members.
const maxMemberPages = 200

// ListMembers returns the mesh's live members, online or not, page by page
// (list_members). An older broker answers ErrUnsupported.
func (c *Client) ListMembers(ctx context.Context) ([]protocol.MemberInfo, error) {
	var out []protocol.MemberInfo
	after := ""
	for range maxMemberPages {
		raw, err := c.request(ctx, func(id string) any {
			return protocol.ListMembers{Type: protocol.TypeListMembers, ReqID: id, After: after, Limit: protocol.MaxMembersPage}
		})
		var re *RequestError
		if errors.As(err, &re) && re.Code == protocol.CodeUnknownType {
			return nil, ErrUnsupported
		}
		if err != nil {
			return nil, err
		}
		var ml protocol.MembersList
		if err := json.Unmarshal(raw, &ml); err != nil {
			return nil, fmt.Errorf("decode members_list: %w", err)
		}
		out = append(out, ml.Members...)
		if ml.Next == "" || ml.Next <= after {
			return out, nil
		}
		after = ml.Next
	}
	return out, nil
}

// MessageStatus asks for the delivery state of a message.
func (c *Client) MessageStatus(ctx context.Context, messageID string) (*protocol.MessageStatusResult, error) {
	raw, err := c.request(ctx, func(id string) any {
		return protocol.MessageStatus{Type: protocol.TypeMessageStatus, ReqID: id, MessageID: messageID}
	})
	if err != nil {
		return nil, err
	}
	var r protocol.MessageStatusResult
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("decode message_status_result: %w", err)
	}
	if r.Error != "" {
		return &r, fmt.Errorf("message %s: %s", messageID, r.Error)
	}
	return &r, nil
}

// write sends a fire-and-forget frame on the current connection; it
// reports whether it was written.
func (c *Client) write(ctx context.Context, v any) bool {
	c.mu.Lock()
	lc := c.cur
	c.mu.Unlock()
	if lc == nil {
		return false
	}
	return lc.conn.WriteJSON(ctx, v) == nil
}

// SetStatus sets this session's status (idle, working or dnd); source is
// manual (or "") or jsonl. The status is also restored after a reconnection
// that creates a new presence. Sent now when connected, else on connect.
func (c *Client) SetStatus(ctx context.Context, status, source string) error {
	if !protocol.ValidStatus(status) {
		return fmt.Errorf("status %q must be idle, working or dnd", status)
	}
	if source != "" && source != protocol.SourceManual && source != protocol.SourceJSONL {
		return fmt.Errorf("source %q must be manual or jsonl", source)
	}
	c.mu.Lock()
	c.want.status, c.want.source, c.want.hasStatus = status, source, true
	c.mu.Unlock()
	if !c.write(ctx, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: status, Source: source}) {
		c.markUnsent()
	}
	return nil
}

// SetSummary sets this session's free-text summary (at most 512 bytes).
func (c *Client) SetSummary(ctx context.Context, summary string) error {
	if len(summary) > protocol.MaxSummaryLen {
		return fmt.Errorf("summary is %d bytes; at most %d", len(summary), protocol.MaxSummaryLen)
	}
	c.mu.Lock()
	c.want.summary, c.want.hasSummary = summary, true
	c.mu.Unlock()
	if !c.write(ctx, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: summary}) {
		c.markUnsent()
	}
	return nil
}

// markUnsent makes the next connection restore the desired state even if
// it reattaches (the broker never saw the change).
func (c *Client) markUnsent() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.want.unsent = true
	if c.cur != nil {
		_ = c.cur.conn.CloseNow() // a failed write means the socket is dead
	}
}

// JoinGroup adds this session to a group (kept across reconnections).
func (c *Client) JoinGroup(ctx context.Context, name string) error {
	if err := protocol.ValidateGroupName(name); err != nil {
		return err
	}
	c.mu.Lock()
	if !slices.Contains(c.groups, name) {
		c.groups = append(c.groups, name)
	}
	c.mu.Unlock()
	c.write(ctx, protocol.GroupOp{Type: protocol.TypeJoinGroup, Name: name})
	return nil
}

// LeaveGroup removes this session from a group.
func (c *Client) LeaveGroup(ctx context.Context, name string) error {
	if err := protocol.ValidateGroupName(name); err != nil {
		return err
	}
	c.mu.Lock()
	c.groups = slices.DeleteFunc(c.groups, func(g string) bool { return g == name })
	c.mu.Unlock()
	c.write(ctx, protocol.GroupOp{Type: protocol.TypeLeaveGroup, Name: name})
	return nil
}

// Groups lists the groups this session is in.
func (c *Client) Groups() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.groups)
}
