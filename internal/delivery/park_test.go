package delivery_test

import (
	"context"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
)

// held starts node A with a recipient whose hello claim is in flight:
// held after it leased the rows inserted before (gate), so that sends
// commit meanwhile.
func held(t *testing.T, old []string, configure ...func(*session)) (v *env, a *node, s, r *session, open func(), ins []delivery.Inserted) {
	t.Helper()
	v = newEnv(t)
	g := newGated(v.q)
	v.queue = g
	a = v.node("A")
	a.e.TestSignals.ClaimRound.Init()
	s = a.session(v, "sender", "A/s")
	ins = v.insert("sender", 1, "rcpt", old...)
	open = gate(&g.claimedGate)
	r = a.session(v, "rcpt", "A/r", configure...)
	wait(t, g.claimed, "the hello claim")
	t.Cleanup(open)
	return v, a, s, r, open, ins
}

// sendAll sends bodies from s to rcpt and waits until their commits have
// settled (the acks come first).
func sendAll(t *testing.T, a *node, s *session, bodies []string) {
	t.Helper()
	a.e.TestSignals.Settled.Init()
	a.e.TestSignals.Settled.Clear()
	for _, b := range bodies {
		a.send(s, 1, b, "rcpt")
	}
	s.waitAcks(t, len(bodies))
	n := 0
	if _, ok := a.e.TestSignals.Settled.WaitFor(10*time.Second, func(m int) bool { n += m; return n >= len(bodies) }); !ok {
		t.Fatalf("%d of %d sends settled", n, len(bodies))
	}
}

// Rows committed for a local session while a claim for its member is in
// flight are written leased to it and pushed once that claim has pushed
// what it took: after it, in order, without a second claim; a later claim
// that reads them before their marks commit does not push them again.
func TestHeldBehindClaimInFlight(t *testing.T) {
	old := numbered("old", 3)
	v, a, s, r, open, _ := held(t, old, func(s *session) { s.clientAck = true })
	fresh := numbered("new", 5)
	sendAll(t, a, s, fresh)
	for _, ack := range s.acks() {
		row, _ := v.q.Row(delivery.Key{MessageID: ack.id, MemberID: "rcpt"})
		if row.LeaseConn != "A/r" || row.LeaseNode != "A#1" || !row.Leased || row.Attempts != 0 {
			t.Fatalf("row %d not written leased to the session behind the claim: %+v", ack.id, row)
		}
	}
	if got := len(r.pushes()); got != 0 {
		t.Fatalf("%d pushes before the claim ended", got)
	}
	open()
	want := append(append([]string{}, old...), fresh...)
	assertOrder(t, r.waitPushes(t, len(want)), want)
	if got := value(a.m.Claims.WithLabelValues("held")); got != float64(len(fresh)) {
		t.Fatalf("held pushes %v, want %d", got, len(fresh))
	}
	for _, reason := range []string{"local", "more", "notify"} {
		if got := value(a.m.Claims.WithLabelValues(reason)); got != 0 {
			t.Fatalf("%v rows claimed (%s): the held rows took a second claim", got, reason)
		}
	}
	// Unacked (client_ack), the held rows are still claimable by this
	// node: a sweep's claim takes them but must not push them again.
	a.e.TestSignals.ClaimRound.Clear()
	a.e.WakeAll(delivery.ReasonSweep)
	if round, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Rows > 0 }); !ok || round.Rows != len(fresh) {
		t.Fatalf("the sweep's claim: %+v", round)
	}
	if got := bodies(r.pushes()); len(got) != len(want) {
		t.Fatalf("pushed %v: held rows pushed twice", got)
	}
}

// A row committed while a claim was in flight, and so written leased to
// this node for the session, may be read and pushed by the next claim
// before its commit has settled. The commit then finds the member caught
// up, but must not push the row again, even once its delivery mark has
// committed (nothing else remembers the push then).
func TestHeldRowClaimedBeforeItsCommitSettles(t *testing.T) {
	v, a, s, r, open, _ := held(t, []string{"old"})
	g := v.queue.(*gatedQueue)
	openInserted := gate(&g.insertedGate)
	t.Cleanup(openInserted)
	a.send(s, 1, "new", "rcpt")
	wait(t, g.inserted, "the commit of new") // committed, not settled
	a.e.TestSignals.Marked.Init()
	open() // the hello claim ends: "new" is not in its snapshot
	assertOrder(t, r.waitPushes(t, 1), []string{"old"})
	marked(t, a, 1)
	a.e.WakeAll(delivery.ReasonSweep) // the next claim reads "new", leased to this node
	assertOrder(t, r.waitPushes(t, 2), []string{"old", "new"})
	marked(t, a, 1)
	openInserted()
	s.waitAcks(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a.e.Stop(ctx) // the commit has settled
	if got := bodies(r.pushes()); len(got) != 2 {
		t.Fatalf("pushed %v: the held row was pushed twice", got)
	}
}

// A held row found caught up as its commit settles is pushed then; if
// its session's queue refuses the push it is given back with its batch's
// later rows. A claim that starts in between must not take and push those
// later rows (leased to this node, claimable) first.
func TestHeldRowRefusedAsItSettles(t *testing.T) {
	v, a, s, r, open, _ := held(t, []string{"old"})
	g := v.queue.(*gatedQueue)
	a.session(v, "other", "A/o")
	openInserted := gate(&g.insertedGate)
	t.Cleanup(openInserted)
	inOneBatch(t, g, a, s, []string{"h0", "h1"}) // held: the hello claim is in flight
	a.e.TestSignals.ClaimRound.Clear()
	open() // the hello claim ends without them
	assertOrder(t, r.waitPushes(t, 1), []string{"old"})
	if _, ok := a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok {
		t.Fatal("the hello claim did not end")
	}
	refused := false
	r.onPush = func(p *delivery.Push) bool {
		if p.Ciphertext != "h0" || refused {
			return false
		}
		refused = true
		// A claim round runs while h0 is being pushed, then h0 is refused.
		a.e.TestSignals.ClaimRound.Clear()
		a.e.WakeAll(delivery.ReasonSweep)
		a.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true })
		return true
	}
	openInserted()
	assertOrder(t, r.waitPushes(t, 3), []string{"old", "h0", "h1"})
}

// marked waits until n more rows have been marked delivered.
func marked(t *testing.T, a *node, n int) {
	t.Helper()
	total := 0
	if _, ok := a.e.TestSignals.Marked.WaitFor(10*time.Second, func(m int) bool { total += m; return total >= n }); !ok {
		t.Fatalf("%d of %d rows marked delivered", total, n)
	}
}

// A claim that came back full may have left older rows unclaimed: the
// rows held behind it are not pushed past them, but left to the next
// claim, which takes them in order.
func TestHeldBehindFullClaimKeepsOrder(t *testing.T) {
	old := numbered("old", 300) // more than one claim takes
	_, a, s, r, open, _ := held(t, old)
	fresh := numbered("new", 3)
	sendAll(t, a, s, fresh)
	open()
	want := append(append([]string{}, old...), fresh...)
	assertOrder(t, r.waitPushes(t, len(want)), want)
	if got := value(a.m.Claims.WithLabelValues("held")); got != 0 {
		t.Fatalf("%v held rows pushed past the rows the full claim left", got)
	}
	next := value(a.m.Claims.WithLabelValues("more")) + value(a.m.Claims.WithLabelValues("local"))
	if next != float64(len(want)-256) {
		t.Fatalf("the next claim took %v rows, want %d", next, len(want)-256)
	}
}

// A session that closes while rows are held for it gives them back: they
// are released, and another session of the member (here on another node)
// claims them, in order, once; the closed one gets none.
func TestHeldRowsOfClosedSessionReleased(t *testing.T) {
	v, a, s, r, open, ins := held(t, []string{"old"}, func(s *session) { s.clientAck = true })
	fresh := numbered("new", 3)
	sendAll(t, a, s, fresh)
	keys := []delivery.Key{{MessageID: ins[0].ID, MemberID: "rcpt"}}
	for _, ack := range s.acks() {
		keys = append(keys, delivery.Key{MessageID: ack.id, MemberID: "rcpt"})
	}
	r.closing.Store(true)
	a.e.Detach(r)
	open()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		leased := 0
		for _, k := range keys {
			if row, _ := v.q.Row(k); row.Leased {
				leased++
			}
		}
		if leased == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d held rows of the closed session still leased", leased)
		}
		<-tick.C
	}
	b := v.node("B")
	nr := b.session(v, "rcpt", "B/r", func(s *session) { s.clientAck = true })
	want := append([]string{"old"}, fresh...)
	assertOrder(t, nr.waitPushes(t, len(want)), want)
	if got := bodies(r.pushes()); len(got) != 0 {
		t.Fatalf("the closed session got %v", got)
	}
	b.e.TestSignals.ClaimRound.Init()
	b.e.WakeAll(delivery.ReasonSweep)
	b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true })
	if got := bodies(nr.pushes()); len(got) != len(want) {
		t.Fatalf("pushed %v", got)
	}
}
