package bench

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/pgtest"
)

// TestPGWrites counts known writes on a table of a fresh database: the
// delta sees exactly the rows written, in at least as many transactions as
// were run, and divides by the delivered count.
func TestPGWrites(t *testing.T) {
	db := pgtest.NewDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `CREATE TABLE bench_probe (id int PRIMARY KEY, v int)`); err != nil {
		t.Fatal(err)
	}
	// The backend publishes its counters on the way to idle when told to.
	flush := func() {
		t.Helper()
		if _, err := conn.Exec(ctx, `SELECT pg_stat_force_next_flush()`); err != nil {
			t.Fatal(err)
		}
	}
	flush()
	before, err := readPGCounters(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`INSERT INTO bench_probe SELECT g, 0 FROM generate_series(1, 5) g`, // 5 inserts
		`UPDATE bench_probe SET v = 1 WHERE id <= 3`,                       // 3 updates
		`DELETE FROM bench_probe WHERE id = 5`,                             // 1 delete
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// A rollback: the tuple was written before the key check refused it,
	// and Postgres counts it (a heap write all the same).
	if _, err := conn.Exec(ctx, `INSERT INTO bench_probe VALUES (1, 1)`); err == nil {
		t.Fatal("duplicate key accepted")
	}
	flush()
	after, err := readPGCounters(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	w := pgDelta(before, after, 3)
	if got := w.Tables["public.bench_probe"]; got != (TableWrites{Inserts: 6, Updates: 3, Deletes: 1}) {
		t.Errorf("table writes %+v, want 6/3/1 (all: %+v)", got, w.Tables)
	}
	if w.RowWrites != 10 || w.WritesPerMsg != 10.0/3 {
		t.Errorf("row writes %d (%.2f per message), want 10 (3.33)", w.RowWrites, w.WritesPerMsg)
	}
	// 4 statements, the flush and the first reading's own transaction.
	if w.Transactions < 5 || w.Transactions > 8 || w.XactsPerMsg != float64(w.Transactions)/3 {
		t.Errorf("transactions %d (%.3f per message), want 5..8", w.Transactions, w.XactsPerMsg)
	}
	if w.StatsResetMidst {
		t.Error("reset flagged")
	}
	if r := pgDelta(after, before, 1); !r.StatsResetMidst {
		t.Error("counters going backwards not flagged")
	}
}

// TestPGStatements reports, from a server that preloads
// pg_stat_statements, the statements run after the first reading with
// their call counts, and not the readings' own.
func TestPGStatements(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pg := faultkit.PrivatePostgres(t, "shared_preload_libraries=pg_stat_statements")
	url := pg.URL("postgres")
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `CREATE TABLE probe_before (id int)`); err != nil { // before the reset: not reported
		t.Fatal(err)
	}
	s, err := startPGStats(ctx, url, 5)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		if _, err := conn.Exec(ctx, `SELECT count(*) FROM generate_series(1, $1::int) AS probe_series`, i+1); err != nil {
			t.Fatal(err)
		}
	}
	w, err := s.finish(ctx, 0, 0, 7)
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, st := range w.Statements {
		switch {
		case strings.Contains(st.Query, "probe_series"):
			found = true
			if st.Calls != 7 || st.Rows != 7 || st.SharePct <= 0 || st.SharePct > 100 {
				t.Errorf("probe statement %+v, want 7 calls and rows, a share in (0, 100]", st)
			}
		case strings.Contains(st.Query, "pg_stat_"), strings.Contains(st.Query, "probe_before"):
			t.Errorf("reported %q", st.Query)
		}
	}
	if !found {
		t.Fatalf("probe statement not reported: %+v", w.Statements)
	}
}
