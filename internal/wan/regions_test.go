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
// duplicates nothing. The targets are measured by TestRegions
// (-tags long); they are not asserted here, where the machine's load
// decides latencies.
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
	g := r.CutGossip("syd", 3*time.Second, wan.GossipCutLoad{Before: time.Second, After: time.Second, HealTimeout: -1})
	g.Load.Check(t)
	if g.Load.Delivered == 0 {
		t.Fatal("no message went through the gossip cut")
	}
	t.Logf("gossip cut: %s", g.Load)
}
