package store_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
)

// The node registry's query keeps a sequential scan (no index serves it),
// which enable_seqscan=off prices at 10^10: past every JIT threshold. A
// plain connection with the store's planner settings compiles it; the
// store's own connections must not (110 ms of Postgres CPU per run).
func TestNoJITOnStoreConnections(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := pgtest.NewDB(t)
	const q = `EXPLAIN (ANALYZE, FORMAT TEXT) SELECT name FROM node WHERE last_seen_at > now() - interval '1 minute'`
	explain := func(run func(string) (pgx.Rows, error)) string {
		t.Helper()
		rows, err := run(q)
		if err != nil {
			t.Fatal(err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(lines, "\n")
	}

	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range store.SessionSettings() { // all of the store's settings but jit's
		if k != "jit" {
			cfg.RuntimeParams[k] = v
		}
	}
	plain, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(context.Background())
	var available bool
	if err := plain.QueryRow(ctx, `SELECT pg_jit_available()`).Scan(&available); err != nil {
		t.Fatal(err)
	}
	if available {
		// The premise: without the store's setting, Postgres compiles it.
		if plan := explain(func(s string) (pgx.Rows, error) { return plain.Query(ctx, s) }); !strings.Contains(plan, "JIT:") {
			t.Fatalf("a plain connection did not compile the registry query; the test proves nothing:\n%s", plan)
		}
	} else {
		t.Log("this Postgres has no JIT provider: only the setting is checked")
	}

	s, err := store.Open(ctx, url, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var jit string
	if err := s.Pool().QueryRow(ctx, `SHOW jit`).Scan(&jit); err != nil {
		t.Fatal(err)
	}
	if jit != "off" {
		t.Fatalf("jit = %q on the store's connections, want off", jit)
	}
	if plan := explain(func(s2 string) (pgx.Rows, error) { return s.Pool().Query(ctx, s2) }); strings.Contains(plan, "JIT:") {
		t.Fatalf("the store's connection compiled the registry query:\n%s", plan)
	}
}
