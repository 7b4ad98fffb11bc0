//go:build long

package wan_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/wan"
)

// TestRegionsFirst measures only the paths that pay set-up: the first
// hello on each node after start, and a send written as Postgres comes
// back after a cut (-wan.postgres-cut; then one once /health is 200
// again), on a fresh
// cluster; it asserts them only where wan.Thresholds enforces them. For
// repeating those rows without the whole of TestRegions:
//
//	go test -tags long -count=3 -run 'TestRegionsFirst$' ./internal/wan/ -v
func TestRegionsFirst(t *testing.T) {
	c := wan.Start(t, pgtest.NewDB(t), wan.Options{Members: 20})
	w := c.Wire
	r := wan.NewRunner(t, c)
	for reg, h := range r.FirstHellos() {
		th := wan.FirstHelloLimit
		t.Logf("first hello %s: %s (wire %s, bound %s)", reg, h.Took, w.Request(reg), th.Bound(w.Request(reg)))
		if !wan.AboveWire(h.Took, w.Request(reg)) {
			t.Errorf("first hello on %s took %s, faster than the wire (%s)", reg, h.Took, w.Request(reg))
		}
		if reg != c.T.Postgres && th.EnforcedFor(reg) && !th.Holds(h.Took, w.Request(reg)) {
			t.Errorf("first hello on %s took %s, over its bound %s", reg, h.Took, th.Bound(w.Request(reg)))
		}
	}
	pc := r.CutPostgres("syd", *flagPostgresCut)
	wire := w.Request("syd")
	t.Logf("postgres cut syd: at heal %s (%d tries %v), after healthy %s, /health 200 after %s (wire %s, bound %s)",
		pc.AtHeal, pc.AtHealTries, pc.AtHealErrors, pc.AfterHealthy, pc.Healthy, wire, wan.FirstSendAfterOutageLimit.Bound(wire))
	if pc.Missing != 0 || pc.Duplicated != 0 {
		t.Errorf("Postgres cut: %d acked sends missing, %d duplicated", pc.Missing, pc.Duplicated)
	}
	if th := wan.FirstSendAfterOutageLimit; th.EnforcedFor("syd") && !th.Holds(pc.AtHeal, wire) {
		t.Errorf("the send written at the heal took %s, over its bound %s", pc.AtHeal, th.Bound(wire))
	}
}
