package delivery_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/delivery/deliverytest"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
)

// clock is the test's time, shared by the queue and the engine.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// directory is a presence replica: who is where.
type directory struct {
	mu     sync.Mutex
	remote map[string]presence.Entry // member → its sole session on another node
}

func (d *directory) MemberPresent(member string) (bool, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.remote[member]
	return ok, ok
}

func (d *directory) SoleRemoteSession(member string) (presence.Entry, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.remote[member]
	return e, ok
}

func (d *directory) setRemote(member string, e presence.Entry) {
	d.mu.Lock()
	if d.remote == nil {
		d.remote = map[string]presence.Entry{}
	}
	d.remote[member] = e
	d.mu.Unlock()
}

type notifier struct{ n atomic.Int64 }

func (n *notifier) Notify(string, []string) { n.n.Add(1) }

type auditor struct {
	mu      sync.Mutex
	queued  int
	expired []int64
}

func (a *auditor) MessagesQueued(_, _ string, _ time.Time, msgs []delivery.QueuedMessage) {
	a.mu.Lock()
	a.queued += len(msgs)
	a.mu.Unlock()
}
func (a *auditor) MessagesDelivered(string, string, []int64) {}
func (a *auditor) MessageExpired(_, _ string, id int64) {
	a.mu.Lock()
	a.expired = append(a.expired, id)
	a.mu.Unlock()
}

// event is what a fake session saw, in order.
type event struct {
	kind string // "ack" or "push"
	id   int64  // the message id
	body string
	// after is the push's ack gate, acked the ack's written channel.
	after <-chan struct{}
	acked <-chan struct{}
	at    int64 // global order
}

var seq atomic.Int64

// session is a fake WebSocket session: both Recipient and Sender. Pushes
// are "written" at once; without clientAck a written push is marked
// delivered, as the real writer does.
type session struct {
	e         *delivery.Engine
	conn      string
	mesh      string
	member    string
	sendOnly  bool
	clientAck bool
	maxPrio   atomic.Int32
	room      atomic.Int64 // pushes it takes before refusing
	slack     atomic.Int64 // Room overstates room by this much, as a real queue may between look and push
	closing   atomic.Bool
	starved   atomic.Bool
	done      chan struct{}
	// onPush, when set, sees each push first; true refuses it.
	onPush func(*delivery.Push) bool

	mu       sync.Mutex
	inflight map[int64]bool
	events   []event
	notify   chan struct{}
}

func newSession(e *delivery.Engine, mesh, member, conn string) *session {
	s := &session{e: e, conn: conn, mesh: mesh, member: member, done: make(chan struct{}),
		inflight: map[int64]bool{}, notify: make(chan struct{}, 1)}
	s.maxPrio.Store(2)
	s.room.Store(1 << 20)
	return s
}

func (s *session) ConnID() string   { return s.conn }
func (s *session) MeshID() string   { return s.mesh }
func (s *session) MemberID() string { return s.member }
func (s *session) SendOnly() bool   { return s.sendOnly }
func (s *session) MaxPriority() int { return int(s.maxPrio.Load()) }
func (s *session) Room() int        { return int(s.room.Load() + s.slack.Load()) }
func (s *session) Closing() bool    { return s.closing.Load() }
func (s *session) Starved() {
	s.starved.Store(true)
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

func (s *session) Reserve(id int64) delivery.Reservation {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing.Load() {
		return delivery.Gone
	}
	if s.inflight[id] {
		return delivery.AlreadyHeld
	}
	s.inflight[id] = true
	return delivery.Reserved
}

func (s *session) Unreserve(id int64) {
	s.mu.Lock()
	delete(s.inflight, id)
	s.mu.Unlock()
}

func (s *session) Push(p *delivery.Push) bool {
	if s.onPush != nil && s.onPush(p) {
		return false
	}
	if s.room.Add(-1) < 0 {
		s.room.Add(1)
		return false
	}
	s.record(event{kind: "push", id: p.MessageID, body: p.Ciphertext, after: p.After})
	if !s.clientAck {
		s.e.Delivered(s.mesh, p.Key())
		s.Unreserve(p.MessageID)
	}
	return true
}

// ack is the client's client_ack: the mark is queued before the session
// forgets the row, as the real session does.
func (s *session) ack(id int64) {
	s.e.Delivered(s.mesh, delivery.Key{MessageID: id, MemberID: s.member})
	s.Unreserve(id)
}

func (s *session) Answer(a protocol.Ack) <-chan struct{} {
	id, _ := strconv.ParseInt(a.MessageID, 10, 64)
	written := make(chan struct{})
	close(written) // written at once
	s.record(event{kind: "ack", id: id, body: a.ID + "|" + a.Error, acked: written})
	return written
}

func (s *session) Done() <-chan struct{} { return s.done }

func (s *session) record(ev event) {
	ev.at = seq.Add(1)
	s.mu.Lock()
	s.events = append(s.events, ev)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// drain gives the session its room back, as a writer that caught up, and
// kicks the engine if a claim was skipped.
func (s *session) drain(room int64) {
	s.room.Store(room)
	if s.starved.Swap(false) {
		s.e.Kick()
	}
}

func (s *session) pushes() []event {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []event
	for _, ev := range s.events {
		if ev.kind == "push" {
			out = append(out, ev)
		}
	}
	return out
}

func (s *session) acks() []event {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []event
	for _, ev := range s.events {
		if ev.kind == "ack" {
			out = append(out, ev)
		}
	}
	return out
}

// value reads a counter.
func value(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

func bodies(evs []event) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = ev.body
	}
	return out
}

// waitPushes waits until the session has n pushes (bounded) and returns
// their bodies.
func (s *session) waitPushes(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		if got := s.pushes(); len(got) >= n {
			return bodies(got)
		}
		select {
		case <-s.notify:
		case <-deadline.C:
			t.Fatalf("%s: %d pushes, want %d: %v", s.conn, len(s.pushes()), n, bodies(s.pushes()))
		}
	}
}

// waitAcks waits until the session has n acks (bounded).
func (s *session) waitAcks(t *testing.T, n int) []event {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		if got := s.acks(); len(got) >= n {
			return got
		}
		select {
		case <-s.notify:
		case <-deadline.C:
			t.Fatalf("%s: %d acks, want %d", s.conn, len(s.acks()), n)
		}
	}
}

// node is an engine on the shared in-memory queue.
type node struct {
	name string
	e    *delivery.Engine
	m    *metrics.Metrics
	dir  *directory
	aud  *auditor
}

type env struct {
	t     *testing.T
	clock *clock
	key   *relay.EnvelopeKey
	q     *deliverytest.Queue
	queue delivery.Queue // what the engines use (q, or a wrapper of it)
	mesh  string
	// live, when set for a node's name, is that engine's Liveness.
	live map[string]delivery.Liveness
}

func newEnv(t *testing.T) *env {
	key, err := relay.NewEnvelopeKey([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	c := newClock()
	q := deliverytest.NewQueue(c.Now, key)
	return &env{t: t, clock: c, key: key, q: q, queue: q, mesh: "mesh"}
}

// node starts an engine named name; stopped when the test ends. The
// envelopes the queue sends to its channel reach it.
func (v *env) node(name string, configure ...func(*delivery.Config)) *node {
	n := v.nodeManual(name, configure...)
	channel := relay.NodeChannel(name)
	v.q.Subscribe(func(ch, payload string) {
		if ch == channel {
			n.envelope(v, payload)
		}
	})
	return n
}

// envelope hands a notification of its channel to the node, as its relay
// listener would.
func (n *node) envelope(v *env, payload string) {
	if !relay.IsEnvelope(payload) {
		return
	}
	sentAt, e, err := relay.DecodeEnvelope(payload, v.key)
	if err != nil {
		v.t.Errorf("envelope for %s: %v", n.name, err)
		return
	}
	n.e.RelayEnvelope(sentAt, e)
}

// nodeManual is node without its envelopes: the test hands them over.
func (v *env) nodeManual(name string, configure ...func(*delivery.Config)) *node {
	reg := prometheus.NewRegistry()
	n := &node{name: name, m: metrics.New(reg), dir: &directory{}, aud: &auditor{}}
	cfg := delivery.Config{Node: name, Incarnation: 1, LeaseDuration: 30 * time.Second, MessageTTL: time.Hour,
		SweepInterval: time.Hour, Now: v.clock.Now}
	for _, f := range configure {
		f(&cfg)
	}
	n.e = delivery.New(cfg, delivery.Deps{Queue: v.queue, Directory: n.dir, Notifier: &notifier{}, Auditor: n.aud,
		Metrics: n.m, Logger: slog.New(slog.DiscardHandler), Liveness: v.live[name]})
	if err := n.e.Start(context.Background()); err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n.e.Stop(ctx)
		if !n.e.Stopped() {
			v.t.Errorf("engine %s did not stop", name)
		}
	})
	return n
}

// session attaches a fake session of member to the node.
func (n *node) session(v *env, member, conn string, configure ...func(*session)) *session {
	s := newSession(n.e, v.mesh, member, conn)
	for _, f := range configure {
		f(s)
	}
	v.q.AddMember(v.mesh, member)
	n.e.Attach(s)
	return s
}

// send submits a message from one fake session to members.
func (n *node) send(from *session, prio int16, body string, to ...string) {
	msg := delivery.NewMessage{MeshID: from.mesh, SenderMemberID: from.member, SenderPubkey: "pk", SenderName: from.member,
		TargetSpec: "spec", Priority: prio, Nonce: "n", Ciphertext: body}
	for _, m := range to {
		msg.Recipients = append(msg.Recipients, delivery.NewRecipient{MemberID: m})
	}
	n.e.Submit(&delivery.Send{From: from, ID: body, Message: msg})
}

// insert writes rows into the queue directly, as another node's commit
// that announced nothing.
func (v *env) insert(from string, prio int16, to string, bodies ...string) []delivery.Inserted {
	v.t.Helper()
	var msgs []delivery.NewMessage
	for _, b := range bodies {
		msgs = append(msgs, delivery.NewMessage{MeshID: v.mesh, SenderMemberID: from, SenderPubkey: "pk", SenderName: from,
			TargetSpec: "spec", Priority: prio, Nonce: "n", Ciphertext: b, Recipients: []delivery.NewRecipient{{MemberID: to}}})
	}
	res, err := v.q.InsertMessages(context.Background(), &delivery.InsertParams{Messages: msgs, TTL: time.Hour, LeaseNode: "x#1", Lease: time.Minute})
	if err != nil {
		v.t.Fatal(err)
	}
	return res
}

func numbered(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%03d", prefix, i)
	}
	return out
}

func assertOrder(t *testing.T, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("pushed %v\nwant   %v", got, want)
	}
}
