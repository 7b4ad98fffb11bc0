package node_test

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// A start that fails late (a listener's address taken) stops every part
// that had started: no loop or worker is left running against the closed
// pool.
func TestFailedStartStopsWhatStarted(t *testing.T) {
	db := pgtest.NewDB(t)
	for _, tc := range []struct {
		name string
		set  func(c *config.Config, busy string)
	}{
		{"metrics listener", func(c *config.Config, busy string) { c.MetricsAddr = busy }},
		{"local hook listener", func(c *config.Config, busy string) { c.HookLocalAddr = busy }},
		{"gossip", func(c *config.Config, busy string) { c.ClusterBind = busy }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			taken, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer taken.Close()
			before := goleak.IgnoreCurrent()
			cfg := testkit.Config(db)
			tc.set(cfg, taken.Addr().String())
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			n, err := node.Start(ctx, node.Options{Config: cfg, Logger: testkit.Logger(t), Listener: ln})
			if err == nil {
				_ = n.Shutdown(ctx)
				t.Fatalf("start with %s taken succeeded", tc.name)
			}
			goleak.VerifyNone(t, append(pgtest.LeakOptions(), before)...)
		})
	}
}
