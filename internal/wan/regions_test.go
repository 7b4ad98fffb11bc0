package wan_test

import (
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/wan"
)

// The default suite's check of the multi-region harness and of what holds
// on a loaded machine: three regions with issue 14's delays, the WAN
// profile. Every hello and send on a far node pays at least its round trip
// to Postgres, every cross-region push at least the one-way sum (the
// harness delays what it should), each arrives, and a gossip cut loses and
// duplicates nothing; a presence change crosses in about one one-way
// delay, no node is declared dead before the cut and the cut region is
// found unreachable during it. The targets are measured by
// TestRegions (-tags long); they are asserted here only with bounds a
// loaded machine keeps.
func TestRegionsShort(t *testing.T) {
	c := wan.Start(t, pgtest.NewDB(t), wan.Options{Members: 40})
	w := c.Wire
	r := wan.NewRunner(t, c)
	for reg, d := range r.LaterHellos(2) {
		if !wan.AboveWire(d.Min, w.Request(reg)) {
			t.Errorf("a hello on %s took %s, faster than its round trip to Postgres (%s)", reg, d.Min, w.Request(reg))
		}
	}
	first, later := r.SendAcks(4)
	for reg, d := range later {
		if !wan.AboveWire(first[reg], w.Request(reg)) || !wan.AboveWire(d.Min, w.Request(reg)) {
			t.Errorf("a send on %s was acked after %s (first %s), faster than its round trip to Postgres (%s)",
				reg, d.Min, first[reg], w.Request(reg))
		}
	}
	for _, pr := range [][2]string{{"syd", "iad"}, {"ams", "syd"}} {
		p := r.Pushes(pr[0], pr[1], 4)
		if wire := w.Push(pr[0], pr[1]); p.N != 4 || !wan.AboveWire(p.Min, wire) {
			t.Errorf("push %s→%s: %d arrived, the fastest after %s; the wire allows %s", pr[0], pr[1], p.N, p.Min, wire)
		}
	}
	// A presence change crosses in one one-way delay, not the three a
	// new TCP connection per delta cost (~420 ms here): the bound leaves
	// the loaded machine 150 ms.
	// The join is timed from the peer's hello_ack, which its node writes
	// just after it sent the delta: on a loaded machine the delta can
	// look a few milliseconds faster than the wire (seen: 136 ms of 140).
	joins := r.PresenceJoins("syd", "ams", 3)
	if wire := w.Join("syd", "ams"); !wan.AboveWire(joins.Min+10*time.Millisecond, wire) || joins.P50 > wire+150*time.Millisecond {
		t.Errorf("presence syd→ams: p50 %s, fastest %s; the wire allows %s", joins.P50, joins.Min, wire)
	}
	deaths, _ := c.DetectorCounts()
	if deaths != 0 {
		t.Errorf("%d nodes declared dead before any cut", deaths)
	}
	g := r.CutGossip("syd", 3*time.Second, wan.GossipCutLoad{Before: time.Second, After: time.Second, HealTimeout: -1})
	g.Load.Check(t)
	if g.Load.Delivered == 0 {
		t.Fatal("no message went through the gossip cut")
	}
	if g.Unreachable == 0 {
		t.Error("the other nodes did not find syd unreachable during a 3 s gossip cut")
	}
	t.Logf("presence syd→ams %v; gossip cut: unreachable after %s, dead after %s; %s", joins, g.Unreachable, g.DeclaredDead, g.Load)
}

// Issue 14's failover: a peer's node is killed right after a sender's
// node leased rows to the peer's session there, messages are acked for
// the peer while it is away, and it reattaches in another region: its new
// session takes the dead node's leases over, and every message arrives
// within wan.FailoverLimit of its hello_ack, once.
func TestRegionsFailover(t *testing.T) {
	c := wan.Start(t, pgtest.NewDB(t), wan.Options{Members: 10})
	f := wan.NewRunner(t, c).Failover("syd", "ams", "iad", 20)
	if f.Got != f.N || f.Dup != 0 {
		t.Errorf("failover: %s", f)
	}
	if f.Leased == 0 {
		t.Errorf("failover: no row was leased to the dead session, the takeover was not exercised: %s", f)
	}
	if !wan.FailoverLimit.Holds(f.Delivered, 0) {
		t.Errorf("failover: the last message came %s after the reattach, want %s: %s", f.Delivered, wan.FailoverLimit, f)
	}
	t.Logf("failover: %s", f)
}
