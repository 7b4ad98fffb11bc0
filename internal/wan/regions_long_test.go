//go:build long

package wan_test

import (
	"flag"
	"os"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/wan"
)

var (
	flagDelays      = flag.String("wan.delays", "", "override one-way delays, e.g. ams-iad=40ms,ams-syd=140ms,iad-syd=100ms")
	flagClient      = flag.Duration("wan.client", 0, "one-way delay between a peer and its region's node (0: peers connect directly)")
	flagProfile     = flag.String("wan.profile", "wan", "CLUSTER_PROFILE of every node")
	flagGossipCut   = flag.Duration("wan.gossip-cut", 20*time.Second, "how long the gossip cut lasts")
	flagPostgresCut = flag.Duration("wan.postgres-cut", 15*time.Second, "how long the Postgres cut lasts")
	flagNote        = flag.String("wan.note", "", "a note printed with the table (the machine, what else ran)")
	flagJSON        = flag.String("wan.json", "", "append the result to this file as one JSON line")
)

// TestRegions measures every row of the table in docs/DEPLOY.md ("What a
// far region costs") on three simulated regions and prints it:
//
//	go test -tags long -count=1 -run TestRegions ./internal/wan/ -v -args -wan.json=regions.jsonl
//
// It fails when a measurement is faster than the wire allows (the harness
// is broken), when a message is lost or duplicated, or when an enforced
// threshold (wan.Thresholds) does not hold.
func TestRegions(t *testing.T) {
	topo := wan.DefaultTopology()
	if err := topo.ParseDelays(*flagDelays); err != nil {
		t.Fatal(err)
	}
	topo.Client = *flagClient
	c := wan.Start(t, pgtest.NewDB(t), wan.Options{Topology: topo, Profile: *flagProfile})
	res := wan.Run(t, c, wan.Plan{GossipCut: *flagGossipCut, PostgresCut: *flagPostgresCut})
	res.Note = *flagNote
	if err := res.WriteMarkdown(os.Stdout); err != nil {
		t.Fatal(err)
	}
	if *flagJSON != "" {
		f, err := os.OpenFile(*flagJSON, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if err := res.WriteJSON(f); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, ch := range res.Checks {
		if !ch.AboveWire {
			t.Errorf("%s[%s] measured %.1f ms, faster than the wire allows (%.1f ms): a delay is missing", ch.Threshold, ch.Key, ch.Measured, ch.Wire)
		}
		if ch.Enforced && !ch.Holds {
			t.Errorf("%s[%s] measured %.1f ms, over its enforced bound %.1f ms", ch.Threshold, ch.Key, ch.Measured, ch.Bound)
		}
	}
	for _, p := range res.GossipCut.Load.Problems() {
		t.Errorf("gossip cut: %s", p)
	}
	if h := res.Healthy; h.Deaths != 0 {
		t.Errorf("healthy load: %d nodes declared dead while none failed", h.Deaths)
	}
	for _, p := range res.Healthy.Load.Problems() {
		t.Errorf("healthy load: %s", p)
	}
	if pc := res.PostgresCut; pc.Missing != 0 || pc.Duplicated != 0 {
		t.Errorf("Postgres cut: %d acked sends missing, %d duplicated", pc.Missing, pc.Duplicated)
	}
}
