package node_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// Finding 10: /metrics on the WebSocket port without METRICS_TOKEN is
// public. The node says so once at start, naming both settings that close
// it; with either set it says nothing.
func TestPublicMetricsWarnedAtStart(t *testing.T) {
	db := pgtest.NewDB(t)
	for _, tc := range []struct {
		name string
		set  func(*config.Config)
		want int
	}{
		{"public port, no token", func(*config.Config) {}, 1},
		{"public port with a token", func(c *config.Config) { c.MetricsToken = "metrics-secret" }, 0},
		{"private metrics address", func(c *config.Config) { c.MetricsAddr = "127.0.0.1:0" }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testkit.Config(db)
			tc.set(cfg)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			logger, lines := testkit.CaptureLogger(t)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			n, err := node.Start(ctx, node.Options{Config: cfg, Logger: logger, Listener: ln})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = n.Shutdown(ctx) }()
			got := 0
			for _, r := range lines.Level("WARN") {
				msg, _ := r["msg"].(string)
				if strings.Contains(msg, "/metrics") {
					got++
					if !strings.Contains(msg, "METRICS_ADDR") || !strings.Contains(msg, "METRICS_TOKEN") {
						t.Errorf("the warning does not name METRICS_ADDR and METRICS_TOKEN: %q", msg)
					}
				}
			}
			if got != tc.want {
				t.Fatalf("%d warnings about /metrics at start, want %d", got, tc.want)
			}
		})
	}
}
