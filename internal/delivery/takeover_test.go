package delivery_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func (s *session) ClientAck() bool { return s.clientAck }

// liveness is a gossip view: which nodes answer.
type liveness struct {
	mu     sync.Mutex
	self   string
	silent map[string]bool
}

func newLiveness(self string) *liveness { return &liveness{self: self, silent: map[string]bool{}} }

func (l *liveness) Members() []presence.NodeInfo {
	var out []presence.NodeInfo
	for _, n := range []string{"A", "B", "C"} {
		out = append(out, presence.NodeInfo{Name: n, Incarnation: 1, State: "alive", Self: n == l.self})
	}
	return out
}

func (l *liveness) Reachable(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.silent[name]
}

func (l *liveness) setSilent(name string, silent bool) {
	l.mu.Lock()
	l.silent[name] = silent
	l.mu.Unlock()
}

// takeoverEnv: sender on A, the recipient's first session on B (whose
// envelopes the test holds: B is dead, or cut off), the recipient's new
// session to come on C. Every node's view says every node answers.
func takeoverEnv(t *testing.T) (v *env, a, b, c *node, s, old *session, lc *liveness) {
	v = newEnv(t)
	lc = newLiveness("C")
	v.live = map[string]delivery.Liveness{"A": newLiveness("A"), "B": newLiveness("B"), "C": lc}
	a = v.node("A")
	b = v.nodeManual("B")
	c = v.node("C")
	for _, n := range []*node{b, c} {
		n.e.TestSignals.ClaimRound.Init()
		n.e.TestSignals.Marked.Init()
	}
	s = a.session(v, "sender", "A/s")
	old = b.session(v, "rcpt", "B/r", func(s *session) { s.clientAck = true })
	helloClaimed(t, b)
	a.dir.setRemote("rcpt", presence.Entry{Owner: "B", OwnerInc: 1, PresenceID: "p", ConnID: "B/r",
		MeshID: v.mesh, MemberID: "rcpt", Status: protocol.StatusIdle})
	return
}

// sendAcked sends n messages from s to rcpt and waits for their acks.
func sendAcked(t *testing.T, a *node, s *session, prefix string, n int) []string {
	t.Helper()
	want := numbered(prefix, n)
	for _, body := range want {
		// One at a time: each commits alone, as an envelope.
		before := len(s.acks())
		a.send(s, 1, body, "rcpt")
		s.waitAcks(t, before+1)
	}
	return want
}

// The rows a sender leased to the recipient's session on a node that died
// (remote fast path: they never left that node) go to the recipient's new
// session as soon as it attaches elsewhere: pushed once each, in order,
// with or without client_ack. The old node, back or only cut off, can no
// longer claim, mark or give them back.
func TestTakeOverOnReattach(t *testing.T) {
	for _, tc := range []struct {
		name      string
		clientAck bool
		silent    bool // the new node no longer hears the old one
		replaced  bool // the new session is the old one reattaching
	}{
		{"client_ack reattach, old node still answering", true, false, true},
		{"client_ack reattach, old node silent", true, true, true},
		{"v0.1 reattach, old node still answering", false, false, true},
		{"v0.1 reattach, old node silent", false, true, true},
		{"v0.1 new session, old node silent", false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, a, b, c, s, old, lc := takeoverEnv(t)
			want := sendAcked(t, a, s, "m", 20)
			for _, id := range ackIDs(s) {
				if row, _ := v.q.Row(delivery.Key{MessageID: id, MemberID: "rcpt"}); row.LeaseNode != "B#1" || !row.Leased {
					t.Fatalf("row %d not on the remote fast path to B: %+v", id, row)
				}
			}
			lc.setSilent("B", tc.silent)
			var replaced []delivery.Replaced
			if tc.replaced {
				replaced = []delivery.Replaced{{Conn: "B/r", Node: "B"}}
			}
			nr := newSession(c.e, v.mesh, "rcpt", "C/r")
			nr.clientAck = tc.clientAck
			c.e.Attach(nr, replaced...)
			assertOrder(t, nr.waitPushes(t, len(want)), want)
			if got := value(c.m.TakenOver); got != float64(len(want)) {
				t.Fatalf("taken over %v rows, want %d", got, len(want))
			}

			ids := ackIDs(s)
			delivered := func() bool {
				for _, id := range ids {
					if row, _ := v.q.Row(delivery.Key{MessageID: id, MemberID: "rcpt"}); !row.Delivered {
						return false
					}
				}
				return true
			}
			if !tc.clientAck {
				testkit.Eventually(t, 10*time.Second, "the new node's marks of its written pushes", delivered)
			}
			// The old node comes back (or was only cut off): its session
			// acks what it had been pushed, and it sweeps.
			for _, id := range ids {
				old.ack(id)
			}
			if _, ok := b.e.TestSignals.Marked.WaitFor(10*time.Second, func(int) bool { return true }); !ok {
				t.Fatal("the old node's marks were not written")
			}
			b.e.TestSignals.ClaimRound.Clear()
			b.e.WakeAll(delivery.ReasonSweep)
			if round, ok := b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true }); !ok || round.Rows != 0 {
				t.Fatalf("the old node's sweep: %+v", round)
			}
			if got := old.pushes(); len(got) != 0 {
				t.Fatalf("the old node pushed %v", bodies(got))
			}
			for _, id := range ids {
				row, _ := v.q.Row(delivery.Key{MessageID: id, MemberID: "rcpt"})
				if row.LeaseNode != "C#1" || row.LeaseConn != "C/r" || (row.Delivered != !tc.clientAck) {
					t.Fatalf("row %d after the old node's acks: %+v", id, row)
				}
			}
			if tc.clientAck {
				for _, id := range ids {
					nr.ack(id)
				}
				testkit.Eventually(t, 10*time.Second, "the new session's acks marked", delivered)
			}
			// Nothing more reaches the new session, whatever sweeps.
			c.e.TestSignals.ClaimRound.Clear()
			c.e.WakeAll(delivery.ReasonSweep)
			c.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true })
			if got := len(nr.pushes()); got != len(want) {
				t.Fatalf("%d pushes, want %d: %v", got, len(want), bodies(nr.pushes()))
			}
		})
	}
}

// A new session of the member on a node that still hears the old one
// leaves the old node's leases alone; once that node stops answering, the
// rows are taken over at once, and no sender leases it more rows.
func TestTakeOverWhenNodeFallsSilent(t *testing.T) {
	v, a, _, c, s, _, lc := takeoverEnv(t)
	want := sendAcked(t, a, s, "m", 10)
	nr := c.session(v, "rcpt", "C/r2", func(s *session) { s.clientAck = true })
	helloClaimed(t, c)
	if got := nr.pushes(); len(got) != 0 {
		t.Fatalf("rows of an answering node's session taken: %v", bodies(got))
	}
	lc.setSilent("B", true)
	c.e.NodeReach(presence.ReachEvent{Name: "B", Incarnation: 1, Reachable: false})
	assertOrder(t, nr.waitPushes(t, len(want)), want)

	// The sender's view: B silent. Its next rows for the member go by
	// wake-up, and the sweep of C (still hearing nothing from B) takes
	// them over from nobody: they are not leased to B.
	v.live["A"].(*liveness).setSilent("B", true)
	more := sendAcked(t, a, s, "n", 3)
	for _, id := range ackIDs(s)[len(want):] {
		if row, _ := v.q.Row(delivery.Key{MessageID: id, MemberID: "rcpt"}); row.LeaseNode == "B#1" {
			t.Fatalf("row %d leased to a silent node: %+v", id, row)
		}
	}
	c.e.WakeAll(delivery.ReasonSweep)
	assertOrder(t, nr.waitPushes(t, len(want)+len(more)), append(want, more...))
}

func ackIDs(s *session) []int64 {
	var ids []int64
	for _, a := range s.acks() {
		ids = append(ids, a.id)
	}
	return ids
}

// A claim statement that cannot finish in time is retried smaller, at
// once, until it does; the rows arrive in order, once; the budget grows
// back after claims that finish.
func TestClaimShrinksOnTimeout(t *testing.T) {
	v := newEnv(t)
	const slowAbove = 64 // rows: a claim asking for more never finishes
	slow := true
	var mu sync.Mutex
	var asked []int
	v.q.SetClaimHook(func(ctx context.Context, p *delivery.ClaimParams) error {
		sum := 0
		for _, r := range p.Requests {
			sum += int(r.Limit)
		}
		mu.Lock()
		asked = append(asked, sum)
		slowNow := slow
		mu.Unlock()
		if slowNow && sum > slowAbove {
			<-ctx.Done()
			return fmt.Errorf("slow claim: %w: %w", ctx.Err(), delivery.ErrUnavailable)
		}
		return nil
	})
	a := v.node("A", func(c *delivery.Config) { c.StatementTimeout = 50 * time.Millisecond })
	a.e.TestSignals.ClaimShrunk.Init()
	want := numbered("m", 300)
	v.insert("sender", 1, "rcpt", want...)
	r := a.session(v, "rcpt", "A/r", func(s *session) { s.clientAck = true })
	assertOrder(t, r.waitPushes(t, len(want)), want)
	if got := value(a.m.ClaimShrinks); got < 2 {
		t.Fatalf("%v shrinks, want at least 2 (256 → 128 → 64)", got)
	}
	mu.Lock()
	if asked[0] != 256 || asked[1] != 128 || asked[2] != 64 {
		t.Fatalf("claims asked for %v rows, want 256, 128, 64 first", asked)
	}
	slow = false // claims of any size finish from now on
	mu.Unlock()
	for i := 0; i < 8; i++ {
		a.e.TestSignals.ClaimShrunk.Clear()
		v.insert("sender", 1, "rcpt", fmt.Sprint("late", i))
		a.e.WakeAll(delivery.ReasonSweep)
		r.waitPushes(t, len(want)+i+1)
	}
	mu.Lock()
	last := asked[len(asked)-1]
	mu.Unlock()
	if last <= slowAbove {
		t.Fatalf("after 8 claims that finished the last asked for %d rows: the budget did not grow back (%v)", last, asked)
	}
}

// An envelope that arrives while a claim for its member is in flight is
// pushed as soon as that claim has pushed what it took (after it, in
// order), not left to another claim; once, whether or not the claim took
// its row too.
func TestEnvelopeMeetsClaimInFlight(t *testing.T) {
	for _, tc := range []struct {
		name      string
		claimTook bool // the claim reads after the envelope's row committed
	}{{"claim read before the row", false}, {"claim took the row too", true}} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t)
			g := newGated(v.q)
			v.queue = g
			b := v.node("B")
			a, s, r := remote(v, b)
			v.insert("sender", 1, "rcpt", "old")
			var open func()
			if tc.claimTook {
				open = gate(&g.claimGate) // held before it reads
			} else {
				open = gate(&g.claimedGate) // held after it leased "old"
			}
			b.e.TestSignals.ClaimRound.Clear()
			b.e.WakeAll(delivery.ReasonSweep)
			wait(t, g.claimed, "the sweep's claim")
			a.send(s, 1, "env", "rcpt")
			s.waitAcks(t, 1)
			open()
			assertOrder(t, r.waitPushes(t, 2), []string{"old", "env"})
			if _, ok := b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Rows > 0 }); !ok {
				t.Fatal("no claim round")
			}
			relayed := value(b.m.Claims.WithLabelValues("relayed"))
			if tc.claimTook && relayed != 0 || !tc.claimTook && relayed != 1 {
				t.Fatalf("relayed pushes %v", relayed)
			}
			if got := value(b.m.Claims.WithLabelValues("notify")); got != 0 {
				t.Fatalf("%v rows went through another claim", got)
			}
			b.e.TestSignals.ClaimRound.Clear()
			b.e.WakeAll(delivery.ReasonSweep)
			b.e.TestSignals.ClaimRound.WaitFor(10*time.Second, func(delivery.ClaimRound) bool { return true })
			if got := bodies(r.pushes()); len(got) != 2 {
				t.Fatalf("pushed %v", got)
			}
		})
	}
}

// A delivery-mark statement that cannot finish in time is retried at once
// with half the keys until it does: every written push of a session
// without client_ack is marked, once.
func TestMarkShrinksOnTimeout(t *testing.T) {
	v := newEnv(t)
	const slowAbove = 100 // keys: a mark of more never finishes
	var mu sync.Mutex
	var sizes []int
	v.q.SetMarkHook(func(ctx context.Context, p *delivery.MarkParams) error {
		mu.Lock()
		sizes = append(sizes, len(p.Keys))
		mu.Unlock()
		if len(p.Keys) > slowAbove {
			<-ctx.Done()
			return fmt.Errorf("slow mark: %w: %w", ctx.Err(), delivery.ErrUnavailable)
		}
		return nil
	})
	a := v.node("A", func(c *delivery.Config) { c.StatementTimeout = 50 * time.Millisecond })
	want := numbered("m", 400)
	res := v.insert("sender", 1, "rcpt", want...)
	r := a.session(v, "rcpt", "A/r") // no client_ack: written pushes are marked
	assertOrder(t, r.waitPushes(t, len(want)), want)
	testkit.Eventually(t, 10*time.Second, "every push marked", func() bool {
		for _, x := range res {
			if row, _ := v.q.Row(delivery.Key{MessageID: x.ID, MemberID: "rcpt"}); !row.Delivered {
				return false
			}
		}
		return true
	})
	if got := value(a.m.MarkShrinks); got < 1 {
		t.Fatalf("%v mark shrinks, want at least 1", got)
	}
	mu.Lock()
	defer mu.Unlock()
	// Pushes written while a mark runs make the next one: the first may
	// be small, but one must have been slow.
	if slices.Max(sizes) <= slowAbove {
		t.Fatalf("no mark wrote over %d keys: the test did not exercise a slow mark (%v)", slowAbove, sizes)
	}
	if last := sizes[len(sizes)-1]; last > slowAbove {
		t.Fatalf("the last mark wrote %d keys (%v)", last, sizes)
	}
}
