package clustertest_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// loadProfile is the load a fault scenario runs under: the default keeps
// the suite short; `-tags long` (profile_long_test.go) runs the same
// scenarios heavier and longer.
type loadProfile struct {
	Peers  int     // one peer per member, spread over the nodes
	Rate   float64 // messages per second offered, all peers together
	Size   int     // ciphertext bytes per message
	Before int     // messages offered before the fault
	After  int     // messages offered after the burst recovered
}

// burst is a faultkit burst paced in messages.
type burst struct {
	*faultkit.Burst
	t    *testing.T
	rate float64
}

func startBurstOn(t *testing.T, urls []string, mesh *testkit.Mesh) *burst {
	t.Helper()
	b := faultkit.Start(t, faultkit.Options{URLs: urls, Members: mesh.Members[:burstLoad.Peers],
		Rate: burstLoad.Rate, Size: burstLoad.Size, Seed: 1})
	return &burst{Burst: b, t: t, rate: burstLoad.Rate}
}

// run lets the burst offer n more messages.
func (b *burst) run(n int) {
	b.t.Helper()
	want := b.Offered() + n
	timeout := time.Duration(float64(n)/b.rate*float64(time.Second))*3 + 10*time.Second
	testkit.Eventually(b.t, timeout, fmt.Sprintf("%d messages offered", n), func() bool { return b.Offered() >= want })
}

// procMesh creates a mesh of n members in db.
func procMesh(t *testing.T, db string, n int) *testkit.Mesh {
	t.Helper()
	st, err := store.Open(context.Background(), db, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	return testkit.NewMesh(t, st, n)
}

// runPeers runs peers until ctx ends; the test waits for them at cleanup.
func runPeers(t *testing.T, ctx context.Context, peers ...*faultkit.Peer) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.Run(ctx)
		}()
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
}

// logResult logs a scenario's figures on one line starting with RESULT,
// the form docs/RELIABILITY.md quotes.
func logResult(t *testing.T, scenario string, r faultkit.Report, format string, args ...any) {
	t.Helper()
	t.Logf("RESULT %s: %s; %s", scenario, r, fmt.Sprintf(format, args...))
}
