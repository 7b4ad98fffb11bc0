package delivery_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
)

// gatedQueue holds Claim, ReleaseLeases or InsertMessages calls until the
// test opens the gate, to catch the engine in the middle of one.
type gatedQueue struct {
	delivery.Queue
	// claimGate holds a claim before it reads, claimedGate after it has
	// leased its rows (before they reach the engine); insertedGate holds a
	// commit after it has committed (before the committer settles it).
	claimGate, claimedGate, releaseGate, insertedGate atomic.Pointer[chan struct{}]
	claimed, releasing, inserted                      chan struct{} // a gated call has begun
	insertPass                                        chan struct{} // lets one gated commit through
}

func newGated(q delivery.Queue) *gatedQueue {
	return &gatedQueue{Queue: q, claimed: make(chan struct{}, 64), releasing: make(chan struct{}, 64),
		inserted: make(chan struct{}, 64), insertPass: make(chan struct{})}
}

func (g *gatedQueue) InsertMessages(ctx context.Context, p *delivery.InsertParams) ([]delivery.Inserted, error) {
	res, err := g.Queue.InsertMessages(ctx, p)
	if gate := g.insertedGate.Load(); gate != nil {
		g.inserted <- struct{}{}
		select {
		case <-*gate:
		case <-g.insertPass:
		}
	}
	return res, err
}

func (g *gatedQueue) Claim(ctx context.Context, p *delivery.ClaimParams) ([]delivery.Delivery, error) {
	if gate := g.claimGate.Load(); gate != nil {
		g.claimed <- struct{}{}
		<-*gate
	}
	rows, err := g.Queue.Claim(ctx, p)
	if gate := g.claimedGate.Load(); gate != nil && len(rows) > 0 {
		g.claimed <- struct{}{}
		<-*gate
	}
	return rows, err
}

func (g *gatedQueue) ReleaseLeases(ctx context.Context, p *delivery.ReleaseParams) (int64, error) {
	if gate := g.releaseGate.Load(); gate != nil {
		g.releasing <- struct{}{}
		<-*gate
	}
	return g.Queue.ReleaseLeases(ctx, p)
}

func gate(p *atomic.Pointer[chan struct{}]) (open func()) {
	c := make(chan struct{})
	p.Store(&c)
	var once sync.Once
	return func() {
		once.Do(func() {
			p.Store(nil)
			close(c)
		})
	}
}

// helloClaimed waits for the claim round of the session attached last
// (ClaimRound must be on).
func helloClaimed(t *testing.T, n *node) {
	t.Helper()
	if _, ok := n.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok {
		t.Fatal("no claim round for the session's hello")
	}
}

func wait(t *testing.T, c <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// Messages of one sender reach one recipient in the order sent, exactly
// once, whichever path each takes: a recipient whose queue keeps filling
// up turns fast-path pushes into refusals, releases and claims.
func TestOrderPerPairThroughRefusals(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	s := a.session(v, "sender", "A/s")
	r := a.session(v, "rcpt", "A/r", func(s *session) { s.slack.Store(1) })
	r.room.Store(3)
	const n = 300
	want := numbered("m", n)
	go func() {
		for _, b := range want {
			a.send(s, 1, b, "rcpt")
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for len(r.pushes()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pushed", len(r.pushes()), n)
		}
		select {
		case <-r.notify: // a push, or a refusal for want of room
		case <-time.After(time.Until(deadline)):
		}
		if r.starved.Load() {
			r.drain(3) // the writer caught up
		}
	}
	assertOrder(t, bodies(r.pushes()), want)
	if value(a.m.Claims.WithLabelValues("release")) == 0 {
		t.Fatal("no row went through a release and a claim: the test did not exercise refusals")
	}
}

// A send committed while the recipient's older rows are being claimed, or
// while a claim for them is due, does not take the fast path past them.
func TestFastPathNeverOvertakesOlderRows(t *testing.T) {
	t.Run("claim running", func(t *testing.T) {
		v := newEnv(t)
		g := newGated(v.q)
		v.queue = g
		a := v.node("A")
		s := a.session(v, "sender", "A/s")
		v.insert("sender", 1, "rcpt", "old0", "old1", "old2")
		open := gate(&g.claimGate)
		r := a.session(v, "rcpt", "A/r") // its hello claim starts and is held
		wait(t, g.claimed, "the hello claim")
		a.send(s, 1, "new", "rcpt")
		s.waitAcks(t, 1) // committed meanwhile
		open()
		assertOrder(t, r.waitPushes(t, 4), []string{"old0", "old1", "old2", "new"})
	})
	t.Run("claim due", func(t *testing.T) {
		v := newEnv(t)
		g := newGated(v.q)
		v.queue = g
		a := v.node("A")
		s := a.session(v, "sender", "A/s")
		open := gate(&g.claimGate)
		a.session(v, "other", "A/o") // a round for another member runs and is held
		wait(t, g.claimed, "another member's claim")
		v.insert("sender", 1, "rcpt", "old0", "old1")
		r := a.session(v, "rcpt", "A/r") // due, not running: the round is busy
		a.send(s, 1, "new", "rcpt")
		s.waitAcks(t, 1)
		open()
		assertOrder(t, r.waitPushes(t, 3), []string{"old0", "old1", "new"})
	})
}

// While leases of a member are being released, neither a claim nor the
// fast path pushes its newer rows: the released rows still look leased
// and would be overtaken (the rule of commit d6c22b5).
func TestReleaseInFlightHoldsNewerRows(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	// Takes one push, and refuses the second it said it had room for.
	r := a.session(v, "rcpt", "A/r", func(s *session) { s.room.Store(1); s.slack.Store(1) })
	openRelease := gate(&g.releaseGate)
	v.insert("sender", 1, "rcpt", "o0", "o1", "o2")
	a.e.Wake(delivery.ReasonNotify, "rcpt")
	wait(t, g.releasing, "the release of the refused rows")
	assertOrder(t, r.waitPushes(t, 1), []string{"o0"})
	r.room.Store(100) // room again, but the release has not committed
	r.slack.Store(0)
	a.e.TestSignals.ClaimRound.Clear()
	a.send(s, 1, "new", "rcpt")
	s.waitAcks(t, 1)
	if _, ok := a.e.TestSignals.ClaimRound.Wait(10 * time.Second); !ok {
		t.Fatal("no claim round after the send")
	}
	if got := bodies(r.pushes()); len(got) != 1 {
		t.Fatalf("pushed %v while the release of o1, o2 was in flight", got)
	}
	openRelease()
	assertOrder(t, r.waitPushes(t, 4), []string{"o0", "o1", "o2", "new"})
}

// hellosClaimed waits for the hello claims of n members.
func hellosClaimed(t *testing.T, a *node, n int) {
	t.Helper()
	got := 0
	if _, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { got += c.Members; return got >= n }); !ok {
		t.Fatalf("%d of %d hello claims", got, n)
	}
}

// A release that begins while a claim for the member is in flight holds
// back that claim's pushes too: here a session closes, giving back rows
// pushed to it and not acked, while a claim for the member's other
// session, planned before, reads the sender's next row; the given-back
// rows still looked leased to it. What the claim took goes back, and the
// claim after the release takes them all in order.
func TestReleaseDuringClaimHoldsItsPushes(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	r1 := a.session(v, "rcpt", "A/r1", func(s *session) { s.clientAck = true })
	hellosClaimed(t, a, 2)
	sendAll(t, a, s, []string{"o0", "o1"})
	assertOrder(t, r1.waitPushes(t, 2), []string{"o0", "o1"}) // leased to r1, not acked
	a.e.TestSignals.ClaimRound.Clear()
	r2 := a.session(v, "rcpt", "A/r2", func(s *session) { s.clientAck = true })
	hellosClaimed(t, a, 1)
	v.insert("sender", 1, "rcpt", "n0") // committed for a claim
	openClaim := gate(&g.claimGate)
	t.Cleanup(openClaim)
	r1.closing.Store(true) // no claim picks it
	a.e.Wake(delivery.ReasonNotify, "rcpt")
	wait(t, g.claimed, "the claim for r2")
	openRelease := gate(&g.releaseGate)
	t.Cleanup(openRelease)
	var keys []delivery.Key
	for _, p := range r1.pushes() {
		keys = append(keys, delivery.Key{MessageID: p.id, MemberID: "rcpt"})
	}
	a.e.Detach(r1)
	a.e.Release("A/r1", v.mesh, "rcpt", keys) // as the session's teardown does
	wait(t, g.releasing, "the release of r1's rows")
	a.e.TestSignals.ClaimRound.Clear()
	openClaim() // reads n0, not o0 and o1: still leased
	if round, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Rows > 0 }); !ok || round.Rows != 1 {
		t.Fatalf("the held claim: %+v", round)
	}
	if got := bodies(r2.pushes()); len(got) != 0 {
		t.Fatalf("pushed %v before o0 and o1 were released", got)
	}
	openRelease()
	assertOrder(t, r2.waitPushes(t, 3), []string{"o0", "o1", "n0"})
	if got := value(a.m.ClaimsGivenBack); got != 1 {
		t.Fatalf("claims given back: %v, want 1", got)
	}
}

// inOneBatch commits x (to another member) and holds it after its commit,
// queues bodies from s to rcpt behind it, and lets x go: they commit as
// one batch, which is held after its commit in turn (insertedGate).
func inOneBatch(t *testing.T, g *gatedQueue, a *node, s *session, bodies []string) {
	t.Helper()
	a.send(s, 1, "x", "other")
	wait(t, g.inserted, "the commit of x")
	for _, b := range bodies {
		a.send(s, 1, b, "rcpt") // behind x: same sender
	}
	g.insertPass <- struct{}{}
	wait(t, g.inserted, "the commit of the batch")
}

// A batch whose first rows for a session would be pushed directly and
// whose later ones are left to a claim (the session's room ran out)
// commits them all at once, but pushes only as it settles: a claim in
// between must not push the later ones first. It takes them all, in order.
func TestNoClaimPastAnUnsettledDirectPush(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	a.session(v, "other", "A/o")
	r := a.session(v, "rcpt", "A/r", func(s *session) { s.room.Store(2) })
	hellosClaimed(t, a, 3)
	open := gate(&g.insertedGate)
	t.Cleanup(open)
	inOneBatch(t, g, a, s, []string{"m0", "m1", "m2"}) // m0, m1 direct; m2 for a claim
	r.drain(100)
	a.e.TestSignals.ClaimRound.Clear()
	a.e.WakeAll(delivery.ReasonSweep)
	if _, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok {
		t.Fatal("no claim round for the sweep")
	}
	open()
	assertOrder(t, r.waitPushes(t, 3), []string{"m0", "m1", "m2"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a.e.Stop(ctx) // the batch has settled
	assertOrder(t, bodies(r.pushes()), []string{"m0", "m1", "m2"})
}

// remote is a sender on node A and a recipient on node B (client_ack:
// its rows stay undelivered until it acks), whose only session A's
// replica knows.
func remote(v *env, b *node) (a *node, s, r *session) {
	a = v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	b.e.TestSignals.ClaimRound.Init()
	s = a.session(v, "sender", "A/s")
	// The sender's hello claim must be over before a test gates claims:
	// a gate holds A's claims too, and one of them taken for B's would
	// let B's run outside the moment the test means to catch.
	helloClaimed(v.t, a)
	r = b.session(v, "rcpt", b.name+"/r", func(s *session) { s.clientAck = true })
	helloClaimed(v.t, b)
	a.dir.setRemote("rcpt", presence.Entry{Owner: b.name, OwnerInc: 1, PresenceID: "p", ConnID: b.name + "/r",
		MeshID: v.mesh, MemberID: "rcpt", Status: protocol.StatusIdle})
	return a, s, r
}

// A row carried by an envelope is pushed once: a claim that read it
// straight from the envelope's lease before its delivery mark committed
// finds it taken, even once the session has acked and forgotten it.
func TestRemoteFastPathThenClaim(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	b := v.node("B")
	b.e.TestSignals.Marked.Init()
	a, s, r := remote(v, b)
	a.send(s, 1, "env", "rcpt")
	assertOrder(t, r.waitPushes(t, 1), []string{"env"})
	if got := value(b.m.Claims.WithLabelValues("relayed")); got != 1 {
		t.Fatalf("relayed pushes %v, want 1", got)
	}
	open := gate(&g.claimedGate)
	b.e.WakeAll(delivery.ReasonSweep)
	wait(t, g.claimed, "the sweep's claim to lease the row")
	r.ack(r.pushes()[0].id) // the client acks; the mark commits
	if _, ok := b.e.TestSignals.Marked.WaitFor(10*time.Second, func(n int) bool { return n == 1 }); !ok {
		t.Fatal("the ack was not marked")
	}
	b.e.TestSignals.ClaimRound.Clear()
	open()
	if round, ok := b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Rows > 0 }); !ok || round.Rows != 1 {
		t.Fatalf("the sweep's claim: %+v", round)
	}
	if got := bodies(r.pushes()); len(got) != 1 {
		t.Fatalf("pushed %v: the claim pushed the envelope's row again", got)
	}
}

// An envelope's push that its session's queue refuses gives the row back;
// a claim that starts while it is being pushed must not take and push the
// batch's next envelope row (leased to this node, claimable) first.
func TestEnvelopeRefusedWhileAClaimStarts(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	b := v.node("B")
	a, s, r := remote(v, b)
	a.session(v, "other", "A/o")
	refused := false
	r.onPush = func(p *delivery.Push) bool {
		if p.Ciphertext != "e0" || refused {
			return false
		}
		refused = true
		b.e.TestSignals.ClaimRound.Clear()
		b.e.WakeAll(delivery.ReasonSweep)
		b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true })
		return true
	}
	open := gate(&g.insertedGate)
	t.Cleanup(open)
	inOneBatch(t, g, a, s, []string{"e0", "e1"}) // both carried by envelopes to B
	open()
	assertOrder(t, r.waitPushes(t, 2), []string{"e0", "e1"})
	if !refused {
		t.Fatal("e0 was not pushed from its envelope")
	}
}

// The set of rows a fast path handled is bounded: at its bound an
// envelope is not pushed on arrival but left to a claim, which pushes its
// row once, and the refusal is counted.
func TestHandledSetBounded(t *testing.T) {
	v := newEnv(t)
	b := v.node("B")
	a, s, r := remote(v, b)
	delivery.FillHandled(b.e)
	a.send(s, 1, "env", "rcpt")
	assertOrder(t, r.waitPushes(t, 1), []string{"env"})
	if got := value(b.m.HandledFull); got < 1 {
		t.Fatalf("handled-set refusals %v, want at least 1", got)
	}
	if got := value(b.m.Claims.WithLabelValues("relayed")); got != 0 {
		t.Fatalf("relayed pushes %v, want 0: the envelope was pushed past the bound", got)
	}
	b.e.WakeAll(delivery.ReasonSweep)
	if _, ok := b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true }); !ok {
		t.Fatal("no sweep round")
	}
	if got := bodies(r.pushes()); len(got) != 1 {
		t.Fatalf("pushed %v, want the row once", got)
	}
}

// A claim that takes a remote fast-path row before its envelope arrives
// pushes it; the late envelope does not push it again, even once the
// session has acked and forgotten it.
func TestClaimThenRemoteEnvelope(t *testing.T) {
	v := newEnv(t)
	var mu sync.Mutex
	var held []string
	v.q.Subscribe(func(ch, payload string) {
		if ch == relay.NodeChannel("B") {
			mu.Lock()
			held = append(held, payload)
			mu.Unlock()
		}
	})
	b := v.nodeManual("B")
	b.e.TestSignals.Marked.Init()
	a, s, r := remote(v, b)
	a.send(s, 1, "late", "rcpt")
	s.waitAcks(t, 1)
	b.e.WakeAll(delivery.ReasonSweep)
	assertOrder(t, r.waitPushes(t, 1), []string{"late"})
	r.ack(r.pushes()[0].id)
	if _, ok := b.e.TestSignals.Marked.WaitFor(10*time.Second, func(n int) bool { return n == 1 }); !ok {
		t.Fatal("the ack was not marked")
	}
	mu.Lock()
	envelopes := held
	mu.Unlock()
	if len(envelopes) != 1 {
		t.Fatalf("%d envelopes sent, want 1", len(envelopes))
	}
	b.envelope(v, envelopes[0])
	if got := value(b.m.Claims.WithLabelValues("relayed")); got != 0 {
		t.Fatalf("the late envelope was pushed (%v)", got)
	}
	if got := bodies(r.pushes()); len(got) != 1 {
		t.Fatalf("pushed %v", got)
	}
}

// A session that dies without giving its rows back leaves them leased
// until the lease runs out; then another session of the member gets them.
// One that closes gives them back at once.
func TestLeaseExpiryAndRelease(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	helloClaimed(t, a)
	r1 := a.session(v, "rcpt", "A/r1", func(s *session) { s.clientAck = true })
	helloClaimed(t, a) // caught up: m1 takes the fast path, no claim round runs
	a.send(s, 1, "m1", "rcpt")
	assertOrder(t, r1.waitPushes(t, 1), []string{"m1"})
	a.e.Detach(r1) // dies: no release
	r2 := a.session(v, "rcpt", "A/r2", func(s *session) { s.clientAck = true })
	if round, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok || round.Rows != 0 {
		t.Fatalf("r2's hello claimed a row under a live lease: %+v", round)
	}
	a.e.WakeAll(delivery.ReasonSweep)
	if round, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok || round.Rows != 0 {
		t.Fatalf("claimed a row under a live lease: %+v", round)
	}
	v.clock.Advance(31 * time.Second)
	a.e.WakeAll(delivery.ReasonSweep)
	assertOrder(t, r2.waitPushes(t, 1), []string{"m1"})

	// r2 closes properly: its row goes back at once to r3.
	r3 := a.session(v, "rcpt", "A/r3", func(s *session) { s.clientAck = true })
	a.e.Detach(r2)
	r2.closing.Store(true)
	a.e.Release(r2.conn, v.mesh, "rcpt", []delivery.Key{{MessageID: r2.pushes()[0].id, MemberID: "rcpt"}})
	assertOrder(t, r3.waitPushes(t, 1), []string{"m1"})
}

// A working or dnd session gets only "now" messages; the others wait, in
// order, until its status lets them through.
func TestHoldsByStatus(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	s := a.session(v, "sender", "A/s")
	r := a.session(v, "rcpt", "A/r", func(s *session) { s.maxPrio.Store(int32(protocol.MaxPriorityRank(protocol.StatusWorking))) })
	a.send(s, 2, "low", "rcpt")
	a.send(s, 1, "next", "rcpt")
	a.send(s, 0, "now", "rcpt")
	assertOrder(t, r.waitPushes(t, 1), []string{"now"})
	s.waitAcks(t, 3)
	r.maxPrio.Store(int32(protocol.MaxPriorityRank(protocol.StatusIdle)))
	a.e.Wake(delivery.ReasonStatus, "rcpt")
	assertOrder(t, r.waitPushes(t, 3), []string{"now", "low", "next"})
}

// A claim planned while the session accepted every priority, whose rows
// come back after it turned working, does not push what working holds.
func TestHoldsByStatusAfterClaimPlanned(t *testing.T) {
	v := newEnv(t)
	g := newGated(v.q)
	v.queue = g
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	open := gate(&g.claimGate)
	r := a.session(v, "rcpt", "A/r") // idle: its hello claim asks for every priority, and is held
	wait(t, g.claimed, "the hello claim")
	v.insert("sender", 1, "rcpt", "next0")
	r.maxPrio.Store(int32(protocol.MaxPriorityRank(protocol.StatusWorking)))
	open()
	if _, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Rows > 0 }); !ok {
		t.Fatal("the held claim did not lease the row")
	}
	if got := bodies(r.pushes()); len(got) != 0 {
		t.Fatalf("pushed %v to a working session", got)
	}
	r.maxPrio.Store(int32(protocol.MaxPriorityRank(protocol.StatusIdle)))
	a.e.Wake(delivery.ReasonStatus, "rcpt")
	assertOrder(t, r.waitPushes(t, 1), []string{"next0"})
}

// A send-only session is never handed a message: its member's rows wait
// for a session that receives.
func TestSendOnlyNeverTargeted(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	only := a.session(v, "rcpt", "A/only", func(s *session) { s.sendOnly = true })
	if a.e.HasLocal("rcpt") {
		t.Fatal("a send-only session became a delivery target")
	}
	a.send(s, 1, "m", "rcpt")
	s.waitAcks(t, 1)
	a.e.WakeAll(delivery.ReasonSweep)
	r := a.session(v, "rcpt", "A/r")
	assertOrder(t, r.waitPushes(t, 1), []string{"m"})
	if len(only.pushes()) != 0 {
		t.Fatalf("send-only session got %v", bodies(only.pushes()))
	}
}

// On one node the sender's ack is queued before the recipient's push, and
// the push is held for the ack's write.
func TestAckBeforePush(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s := a.session(v, "sender", "A/s")
	helloClaimed(t, a)
	r := a.session(v, "rcpt", "A/r")
	// Caught up once its hello's claim is done: then every send takes the
	// fast path.
	helloClaimed(t, a)
	const n = 50
	for _, b := range numbered("m", n) {
		a.send(s, 1, b, "rcpt")
	}
	pushes := r.waitPushes(t, n)
	acks := s.waitAcks(t, n)
	byID := map[int64]event{}
	for _, ack := range acks {
		byID[ack.id] = ack
	}
	for i, p := range r.pushes() {
		ack, ok := byID[p.id]
		if !ok {
			t.Fatalf("push %s without an ack", pushes[i])
		}
		if ack.at > p.at {
			t.Fatalf("push %s queued before its ack", pushes[i])
		}
		if p.after == nil || p.after != ack.acked {
			t.Fatalf("push %s is not held for its ack's write", pushes[i])
		}
	}
}

// The leases of a departed node, and of this node's earlier incarnation,
// go back at once.
func TestNodeLeasesReleased(t *testing.T) {
	v := newEnv(t)
	var msgs []delivery.NewMessage
	for _, node := range []string{"dead#7", "A#0"} {
		msgs = append(msgs, delivery.NewMessage{MeshID: v.mesh, SenderMemberID: "x", Ciphertext: node, Priority: 1,
			Recipients: []delivery.NewRecipient{{MemberID: "rcpt", LeaseConn: "gone", LeaseNode: node}}})
	}
	v.q.AddMember(v.mesh, "rcpt")
	if _, err := v.q.InsertMessages(context.Background(), &delivery.InsertParams{Messages: msgs, TTL: time.Hour, Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	a := v.node("A") // incarnation 1: releases A#0's leases as it starts
	r := a.session(v, "rcpt", "A/r")
	assertOrder(t, r.waitPushes(t, 1), []string{"A#0"})
	a.e.ReleaseNode(context.Background(), "dead", 7)
	assertOrder(t, r.waitPushes(t, 2), []string{"A#0", "dead#7"})
}

// Rows past their TTL are expired, audited and counted.
func TestExpiry(t *testing.T) {
	v := newEnv(t)
	a := v.node("A", func(c *delivery.Config) { c.MessageTTL = time.Minute })
	a.e.TestSignals.Expired.Init()
	s := a.session(v, "sender", "A/s")
	a.send(s, 1, "m", "offline")
	acks := s.waitAcks(t, 1)
	v.clock.Advance(2 * time.Minute)
	a.e.Expire(context.Background())
	if n, ok := a.e.TestSignals.Expired.Wait(time.Second); !ok || n != 1 {
		t.Fatalf("expired %d", n)
	}
	a.aud.mu.Lock()
	defer a.aud.mu.Unlock()
	if len(a.aud.expired) != 1 || a.aud.expired[0] != acks[0].id {
		t.Fatalf("audited %v, want %d", a.aud.expired, acks[0].id)
	}
}

// Once stopping, the engine commits what it accepted and refuses new
// sends as unavailable.
func TestStopRefusesNewSends(t *testing.T) {
	v := newEnv(t)
	a := v.node("A")
	s := a.session(v, "sender", "A/s")
	a.e.Stop(context.Background())
	a.send(s, 1, "late", "rcpt")
	acks := s.waitAcks(t, 1)
	if acks[0].body != "late|"+protocol.CodeUnavailable {
		t.Fatalf("ack after stop: %q", acks[0].body)
	}
}
