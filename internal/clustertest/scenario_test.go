package clustertest_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/pgembed"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// faultScenario is one row of TestFaultScenarios: a cluster, a fault
// injected in the middle of a burst, and what must hold afterwards. Every
// row ends the same way: the burst recovers (when the row measures it),
// runs on, settles, and faultkit's report checks that everything acked was
// delivered exactly once.
type faultScenario struct {
	name  string // the subtest
	label string // the RESULT line's scenario (docs/RELIABILITY.md)
	// The cluster: procs broker processes with env (on a fresh database, or
	// on a private Postgres the fault may stop), or in-process nodes that
	// start makes.
	procs     int
	env       []string
	privatePG bool
	start     func(t *testing.T, c *faultCluster)
	members   int // members beyond the burst's peers
	// burstURLs are the nodes the burst's peers use (all when nil).
	burstURLs func(c *faultCluster) []string
	// fault runs after burstLoad.Before messages.
	fault   func(t *testing.T, c *faultCluster) faultOutcome
	recover time.Duration // bound on the recovery; zero means 30 s
	settle  time.Duration // bound on the settling; zero means 90 s
}

// faultOutcome is what a fault reports back.
type faultOutcome struct {
	// from is when recovery is measured from; zero when the row measured
	// what it needs itself.
	from time.Time
	// result is the rest of the RESULT line, given the recovery.
	result func(recovery time.Duration) string
	// check runs on the settled report (optional).
	check func(r faultkit.Report)
}

// faultCluster is what a scenario runs on.
type faultCluster struct {
	db    string
	pg    *pgembed.Server // with privatePG
	procs []*procNode
	nodes []*testkit.Node
	parts []*faultkit.Partition // in-process nodes' gossip cuts, when start made them
	mesh  *testkit.Mesh
	b     *burst
}

func (c *faultCluster) urls() []string {
	var urls []string
	for _, p := range c.procs {
		urls = append(urls, p.URL())
	}
	return append(urls, nodeURLs(c.nodes)...)
}

func runFaultScenario(t *testing.T, sc faultScenario) {
	c := &faultCluster{}
	if sc.privatePG {
		c.pg = faultkit.PrivatePostgres(t)
		c.db = c.pg.URL("postgres")
	} else {
		c.db = pgtest.NewDB(t)
	}
	if sc.procs > 0 {
		c.procs = startProcNodes(t, c.db, sc.procs, sc.env...)
		c.mesh = procMesh(t, c.db, burstLoad.Peers+sc.members)
	} else {
		sc.start(t, c)
		c.mesh = testkit.NewMesh(t, c.nodes[0].Store(), burstLoad.Peers+sc.members)
	}
	urls := c.urls()
	if sc.burstURLs != nil {
		urls = sc.burstURLs(c)
	}
	c.b = startBurstOn(t, urls, c.mesh)
	c.b.run(burstLoad.Before)

	out := sc.fault(t, c)
	var recovery time.Duration
	if !out.from.IsZero() {
		bound := sc.recover
		if bound == 0 {
			bound = 30 * time.Second
		}
		recovery = c.b.WaitRecovered(t, out.from, bound)
	}
	c.b.run(burstLoad.After)
	settle := sc.settle
	if settle == 0 {
		settle = 90 * time.Second
	}
	r := c.b.Settle(settle)
	r.Check(t)
	if out.check != nil {
		out.check(r)
	}
	logResult(t, sc.label, r, "%s", out.result(recovery))
}

// The fault scenarios of docs/RELIABILITY.md, each under a burst (the
// default suite's load, or `-tags long`'s): nothing acked is lost or
// duplicated, whatever the fault.
func TestFaultScenarios(t *testing.T) {
	for _, sc := range faultScenarios {
		t.Run(sc.name, func(t *testing.T) { runFaultScenario(t, sc) })
	}
}

var faultScenarios = []faultScenario{
	nodeKilled, nodeTerminated, rollingRestart,
	postgresStopped, postgresRestartedTwice, poolBackendsTerminated,
	listenerTerminated, gossipPartition, slowConsumer, clockSkew, reattachTakeover,
}

func roundMs(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

func recoveryIn(format string, args ...any) func(time.Duration) string {
	return func(recovery time.Duration) string {
		return fmt.Sprintf("recovery %s"+format, append([]any{roundMs(recovery)}, args...)...)
	}
}

// shortLeaseCluster starts n in-process nodes whose leases of crashed or
// cut-off sessions run out quickly.
func shortLeaseCluster(n int) func(t *testing.T, c *faultCluster) {
	return func(t *testing.T, c *faultCluster) {
		c.nodes = testkit.StartCluster(t, c.db, n, testkit.Options{Configure: shortLease})
	}
}
