package bench_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/bench"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestSmoke runs every mode briefly against two in-process nodes and
// checks the accounting end to end: everything delivered exactly once,
// latencies and node samples present, the JSON and the plot produced, and
// the bench meshes deleted afterwards.
func TestSmoke(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	// The second node's /metrics is given explicitly, as for a node with
	// METRICS_ADDR; the first one's is derived from its ws:// URL.
	targets := []bench.Target{
		{Name: nodes[0].Name(), URL: nodes[0].URL()},
		{Name: nodes[1].Name(), URL: nodes[1].URL(), MetricsURL: nodes[1].HTTPURL() + "/metrics"},
	}
	st, err := store.Open(context.Background(), db, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	run := func(t *testing.T, o bench.Options) bench.Result {
		t.Helper()
		o.Targets, o.DatabaseURL = targets, db
		o.Settle = 200 * time.Millisecond
		o.DrainTimeout = 20 * time.Second
		o.SampleInterval = 100 * time.Millisecond
		o.StatsWait = 100 * time.Millisecond // the numbers are tested in TestPGWrites
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		res, err := bench.Run(ctx, o)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		if len(res.Meshes) == 0 {
			t.Fatal("no mesh recorded")
		}
		for _, id := range res.Meshes {
			if _, err := st.GetMesh(context.Background(), id); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("mesh %s still there after the run: %v", id, err)
			}
		}
		if len(res.Nodes) != 2 {
			t.Fatalf("want 2 sampled nodes, got %+v", res.Nodes)
		}
		for _, n := range res.Nodes {
			// A scrape may time out on a loaded machine; most must succeed.
			if n.Samples == 0 || n.PeakRSSBytes <= 0 || n.PeakFDs <= 0 || n.Errors >= n.Samples {
				t.Errorf("node %s not sampled: %+v", n.Name, n)
			}
		}
		if res.Generator.PeakRSSBytes <= 0 {
			t.Errorf("generator not sampled: %+v", res.Generator)
		}
		var plot bytes.Buffer
		if err := bench.WritePlot(&plot, res); err != nil {
			t.Fatalf("plot: %v", err)
		}
		if _, err := png.Decode(&plot); err != nil {
			t.Fatalf("plot is not a PNG: %v", err)
		}
		var table bytes.Buffer
		if err := bench.WriteTable(&table, res); err != nil || table.Len() == 0 {
			t.Fatalf("table: %v", err)
		}
		t.Logf("\n%s", table.Bytes())
		return res
	}

	checkDelivery := func(t *testing.T, res bench.Result, expected int64) {
		t.Helper()
		d := res.Delivery
		if d == nil || res.Timing == nil {
			t.Fatalf("no delivery accounting: %+v", res)
		}
		if d.Expected != expected || d.Delivered != expected || d.DeliveredPct != 100 || d.Duplicates != 0 || d.Missing != 0 {
			t.Errorf("delivery: %+v", d)
		}
		if d.Unknown+d.Misrouted+d.Corrupted+d.StrayAcks+d.NotAcked+d.Unsent != 0 || len(d.Rejected) != 0 || len(d.Disconnects) != 0 {
			t.Errorf("anomalies: %+v", d)
		}
		if res.PGWrites == nil || res.PGWrites.Delivered != expected {
			t.Errorf("postgres writes not read: %+v (notes %v)", res.PGWrites, res.Notes)
		}
		if !res.Timing.Drained || res.Timing.DrainedInSec <= 0 {
			t.Errorf("timing: %+v", res.Timing)
		}
		if res.SendToAck.Count != int(d.Messages) || res.SendToPush.Count != int(expected) {
			t.Errorf("sample counts: ack %d push %d", res.SendToAck.Count, res.SendToPush.Count)
		}
		for _, l := range []*bench.Latency{res.SendToAck, res.SendToPush} {
			if l.P50Ms <= 0 || l.P50Ms > l.P99Ms || l.P99Ms > l.MaxMs {
				t.Errorf("latency summary out of order: %+v", l)
			}
		}

		var buf bytes.Buffer
		if err := bench.WriteJSON(&buf, res); err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Mode     string `json:"mode"`
			Delivery struct {
				DeliveredPct float64 `json:"deliveredPct"`
				Duplicates   *int64  `json:"duplicates"`
				Missing      *int64  `json:"missing"`
			} `json:"delivery"`
			SendToPush struct {
				P50 float64 `json:"p50Ms"`
				P99 float64 `json:"p99Ms"`
			} `json:"sendToPush"`
			Nodes []struct {
				PeakRSS int64 `json:"peakRssBytes"`
			} `json:"nodes"`
			Machine struct {
				Cores int    `json:"cores"`
				Go    string `json:"go"`
			} `json:"machine"`
		}
		if err := json.Unmarshal(buf.Bytes(), &doc); err != nil {
			t.Fatalf("JSON: %v\n%s", err, buf.Bytes())
		}
		if doc.Mode != string(res.Mode) || doc.Delivery.DeliveredPct != 100 || doc.Delivery.Duplicates == nil ||
			*doc.Delivery.Duplicates != 0 || doc.Delivery.Missing == nil || *doc.Delivery.Missing != 0 ||
			doc.SendToPush.P50 <= 0 || doc.SendToPush.P99 < doc.SendToPush.P50 ||
			len(doc.Nodes) != 2 || doc.Nodes[0].PeakRSS <= 0 || doc.Machine.Cores <= 0 || doc.Machine.Go == "" {
			t.Errorf("JSON output incomplete:\n%s", buf.Bytes())
		}
	}

	t.Run("burst", func(t *testing.T) {
		res := run(t, bench.Options{Mode: bench.ModeBurst, Peers: 10, Messages: 20, Seed: 1})
		checkDelivery(t, res, 200)
		if res.Delivery.CrossNodePct <= 0 {
			t.Errorf("no cross-node traffic over 2 nodes: %+v", res.Delivery)
		}
	})
	t.Run("broadcast", func(t *testing.T) {
		res := run(t, bench.Options{Mode: bench.ModeBroadcast, Peers: 5, Messages: 4})
		checkDelivery(t, res, 5*4*4)
	})
	t.Run("rate", func(t *testing.T) {
		res := run(t, bench.Options{Mode: bench.ModeRate, Peers: 6, Rate: 200, Duration: time.Second})
		checkDelivery(t, res, 200)
		if res.SendLag == nil || res.SendLag.Count != 200 {
			t.Errorf("send lag not recorded: %+v", res.SendLag)
		}
		if res.Timing.SendSec < 0.9 {
			t.Errorf("200 messages at 200/s took %.2fs to send: not paced", res.Timing.SendSec)
		}
	})
	t.Run("conns", func(t *testing.T) {
		res := run(t, bench.Options{Mode: bench.ModeConns, Conns: 40, SessionsPerMember: 4, ConnsPerMesh: 24, Hold: 300 * time.Millisecond})
		c := res.Conns
		if c == nil || c.Opened != 40 || len(c.Failed) != 0 || len(c.Dropped) != 0 || c.HellosPerSec <= 0 {
			t.Fatalf("conns: %+v", c)
		}
		if c.Members != 10 || c.Meshes != 2 || len(res.Meshes) != 2 {
			t.Errorf("seeding: %d members in %d meshes (%v)", c.Members, c.Meshes, res.Meshes)
		}
		if c.HelloLatency.Count != 40 || c.HelloLatency.P50Ms <= 0 {
			t.Errorf("hello latency: %+v", c.HelloLatency)
		}
		if len(c.PerNode) != 2 || c.PerNode[0].Conns != 20 || c.PerNode[1].Conns != 20 || c.PerNode[0].RSSAfterBytes <= 0 {
			t.Errorf("per node: %+v", c.PerNode)
		}
	})
}

// A run against a broker that does not exist fails fast and says why.
func TestRunErrors(t *testing.T) {
	db := pgtest.NewDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for name, o := range map[string]bench.Options{
		"no targets":   {Mode: bench.ModeBurst, DatabaseURL: db},
		"bad URL":      {Mode: bench.ModeBurst, DatabaseURL: db, Targets: []bench.Target{{URL: "http://x"}}},
		"no database":  {Mode: bench.ModeBurst, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}},
		"unknown mode": {Mode: "soak", DatabaseURL: db, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}},
		"rate no rate": {Mode: bench.ModeRate, DatabaseURL: db, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}, Duration: time.Second},
		"one peer":     {Mode: bench.ModeBurst, Peers: 1, DatabaseURL: db, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}},
		"nodes < 0":    {Mode: bench.ModeBurst, Nodes: -1, DatabaseURL: db, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}},
		"no conns":     {Mode: bench.ModeConns, DatabaseURL: db, Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}},
	} {
		if _, err := bench.Run(ctx, o); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// Valid options, nothing listening: the dial fails and the mesh is
	// cleaned up all the same.
	res, err := bench.Run(ctx, bench.Options{Mode: bench.ModeBurst, Peers: 2, Messages: 1, DatabaseURL: db,
		Targets: []bench.Target{{URL: "ws://127.0.0.1:1/ws"}}, SampleInterval: 50 * time.Millisecond})
	if err == nil {
		t.Fatal("no error against a closed port")
	}
	st, err := store.Open(ctx, db, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, id := range res.Meshes {
		if _, err := st.GetMesh(ctx, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("mesh %s left behind: %v", id, err)
		}
	}
	if len(res.Meshes) != 1 {
		t.Errorf("want the seeded mesh recorded, got %v", res.Meshes)
	}
}

// A cluster whose nodes do not come up fails with the reason and stops
// what it started: Postgres, the processes, the temporary folder.
func TestSpawnFailureCleansUp(t *testing.T) {
	tmp := t.TempDir()
	// Postgres runs as the postgres user when the test runs as root: it
	// must reach the cluster folder.
	for _, d := range []string{filepath.Dir(tmp), tmp} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("TMPDIR", tmp)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := bench.Spawn(ctx, bench.SpawnOptions{Nodes: 1, BrokerBin: "/bin/false", PGFast: true})
	if err == nil || c != nil {
		t.Fatalf("spawn with a broker that exits: %v, %v", c, err)
	}
	if !strings.Contains(err.Error(), "bench-1 exited") {
		t.Errorf("error does not say the node exited: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "meshbench-*")); len(left) != 0 {
		t.Errorf("cluster folder left behind: %v", left)
	}
}
