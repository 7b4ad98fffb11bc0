package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// PGWrites is what Postgres counted during a messaging run's timed phase:
// row writes (inserts, updates and deletes over pg_stat_user_tables) and
// transactions (commits and rollbacks of the database in
// pg_stat_database), each as a delta between a reading before the first
// send and one after the drain, and per delivered message.
//
// Postgres backends publish their counters when they go idle, at most once
// a second, and an idle backend whose last publication was less than a
// second ago waits 10 s: the second reading is taken
// once the counters stood still for the stats wait (WaitSec after the
// drain), so that the nodes' last writes are in it. Whatever the nodes do
// in the background meanwhile (sweeps, presence) is counted too, as are
// the readings' own transactions.
type PGWrites struct {
	Transactions int64 `json:"transactions"`
	RowWrites    int64 `json:"rowWrites"`
	// Tables breaks RowWrites down by table (tables with writes only).
	Tables map[string]TableWrites `json:"tables,omitempty"`
	// Delivered is the divisor: distinct (message, recipient) pairs pushed.
	Delivered       int64   `json:"delivered"`
	WritesPerMsg    float64 `json:"rowWritesPerDelivered"`
	XactsPerMsg     float64 `json:"transactionsPerDelivered"`
	WaitSec         float64 `json:"waitSec"`
	StatsResetMidst bool    `json:"statsResetMidst,omitempty"` // a counter went backwards: the numbers are not usable
	// Statements are the statements that took Postgres the most execution
	// time from the first send to the drain (Options.PGStatements).
	Statements []StatementStat `json:"statements,omitempty"`
}

// StatementStat is one pg_stat_statements entry: a normalised statement
// of the database and what it cost.
type StatementStat struct {
	Query  string  `json:"query"` // whitespace collapsed, cut to 120 characters
	Calls  int64   `json:"calls"`
	Rows   int64   `json:"rows"`
	ExecMs float64 `json:"execMs"` // total execution time
	PlanMs float64 `json:"planMs"` // total planning time (0 unless pg_stat_statements.track_planning)
	JITMs  float64 `json:"jitMs"`  // JIT generation, inlining, optimisation and emission
	// SharePct is ExecMs over the execution time of all the database's
	// statements.
	SharePct float64 `json:"sharePct"`
}

// TableWrites is one table's share of PGWrites.
type TableWrites struct {
	Inserts int64 `json:"inserts"`
	Updates int64 `json:"updates"`
	Deletes int64 `json:"deletes"`
}

// pgCounters is one reading of the cumulative counters.
type pgCounters struct {
	xacts  int64
	tables map[string]TableWrites
}

// readPGCounters reads the database's transaction count and every user
// table's write counters.
func readPGCounters(ctx context.Context, conn *pgx.Conn) (pgCounters, error) {
	c := pgCounters{tables: map[string]TableWrites{}}
	// A statistics snapshot is per transaction: read both views in one.
	tx, err := conn.Begin(ctx)
	if err != nil {
		return c, fmt.Errorf("pg stats: %w", err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if err := tx.QueryRow(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()`).Scan(&c.xacts); err != nil {
		return c, fmt.Errorf("pg stats: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables`)
	if err != nil {
		return c, fmt.Errorf("pg stats: %w", err)
	}
	for rows.Next() {
		var name string
		var w TableWrites
		if err := rows.Scan(&name, &w.Inserts, &w.Updates, &w.Deletes); err != nil {
			rows.Close()
			return c, fmt.Errorf("pg stats: %w", err)
		}
		c.tables[name] = w
	}
	if err := rows.Err(); err != nil {
		return c, fmt.Errorf("pg stats: %w", err)
	}
	return c, tx.Commit(ctx)
}

// pgDelta is after − before, per delivered message. A table that appears
// only in after (created during the run) counts from zero.
func pgDelta(before, after pgCounters, delivered int64) PGWrites {
	w := PGWrites{Transactions: after.xacts - before.xacts, Delivered: delivered, Tables: map[string]TableWrites{}}
	if w.Transactions < 0 {
		w.StatsResetMidst = true
	}
	for name, a := range after.tables {
		b := before.tables[name]
		d := TableWrites{Inserts: a.Inserts - b.Inserts, Updates: a.Updates - b.Updates, Deletes: a.Deletes - b.Deletes}
		if d.Inserts < 0 || d.Updates < 0 || d.Deletes < 0 {
			w.StatsResetMidst = true
		}
		if d == (TableWrites{}) {
			continue
		}
		w.Tables[name] = d
		w.RowWrites += d.Inserts + d.Updates + d.Deletes
	}
	if delivered > 0 {
		w.WritesPerMsg = float64(w.RowWrites) / float64(delivered)
		w.XactsPerMsg = float64(w.Transactions) / float64(delivered)
	}
	return w
}

// pgStats takes the two readings of a run on a connection of its own.
type pgStats struct {
	conn       *pgx.Conn
	before     pgCounters
	statements int // top statements to report; 0 for none
}

// startPGStats takes the first reading; with statements > 0 it also
// resets pg_stat_statements (creating the extension if missing).
func startPGStats(ctx context.Context, url string, statements int) (*pgStats, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("pg stats: %w", err)
	}
	s := &pgStats{conn: conn, statements: statements}
	if statements > 0 {
		if _, err := conn.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_stat_statements`); err != nil {
			conn.Close(context.Background())
			return nil, fmt.Errorf("pg stats: pg_stat_statements (is it in shared_preload_libraries?): %w", err)
		}
		if _, err := conn.Exec(ctx, `SELECT pg_stat_statements_reset()`); err != nil {
			conn.Close(context.Background())
			return nil, fmt.Errorf("pg stats: reset pg_stat_statements: %w", err)
		}
	}
	if s.before, err = readPGCounters(ctx, conn); err != nil {
		conn.Close(context.Background())
		return nil, err
	}
	return s, nil
}

// readStatements reads the database's top n statements by execution
// time, leaving out the readings' own.
func readStatements(ctx context.Context, conn *pgx.Conn, n int) ([]StatementStat, error) {
	rows, err := conn.Query(ctx, `
		WITH s AS (
			SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 120) AS q, calls, rows,
			       total_exec_time, total_plan_time,
			       jit_generation_time + jit_inlining_time + jit_optimization_time + jit_emission_time AS jit
			FROM pg_stat_statements
			WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND query !~ 'pg_stat_(statements|database|user_tables)'
		)
		SELECT q, calls, rows, total_exec_time, total_plan_time, jit,
		       coalesce(100 * total_exec_time / nullif(sum(total_exec_time) OVER (), 0), 0)
		FROM s ORDER BY total_exec_time DESC LIMIT $1`, n)
	if err != nil {
		return nil, fmt.Errorf("pg stats: statements: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (StatementStat, error) {
		var st StatementStat
		err := r.Scan(&st.Query, &st.Calls, &st.Rows, &st.ExecMs, &st.PlanMs, &st.JITMs, &st.SharePct)
		return st, err
	})
	if err != nil {
		return nil, fmt.Errorf("pg stats: statements: %w", err)
	}
	return out, nil
}

// finish reads the counters every second until they moved by at most
// statsQuiet writes and transactions over the last minWait (the nodes'
// backends have published what the run did; what still moves is their
// background work), or until maxWait; then it closes the connection.
func (s *pgStats) finish(ctx context.Context, minWait, maxWait time.Duration, delivered int64) (*PGWrites, error) {
	defer s.conn.Close(context.Background())
	// pg_stat_statements counts a statement when it ends: read at the
	// drain, before the background work of the wait below.
	var statements []StatementStat
	if s.statements > 0 {
		var err error
		if statements, err = readStatements(ctx, s.conn, s.statements); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	var readings []pgCounters
	var at []time.Duration
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		c, err := readPGCounters(ctx, s.conn)
		if err != nil {
			return nil, err
		}
		now := time.Since(start)
		readings, at = append(readings, c), append(at, now)
		if now >= maxWait {
			break
		}
		if now < minWait {
			continue
		}
		// The reading minWait ago (or the closest after it).
		i := 0
		for i+1 < len(at) && at[i+1] <= now-minWait {
			i++
		}
		d := pgDelta(readings[i], c, 0)
		if now-at[i] >= minWait && d.RowWrites+d.Transactions <= statsQuiet(pgDelta(s.before, c, 0)) {
			break
		}
	}
	w := pgDelta(s.before, readings[len(readings)-1], delivered)
	w.WaitSec = at[len(at)-1].Seconds()
	w.Statements = statements
	return &w, nil
}

// statsQuiet is how much the counters may still move for the run's to be
// complete: the nodes' background work, or a thousandth of the run.
func statsQuiet(run PGWrites) int64 {
	return max(50, (run.RowWrites+run.Transactions)/1000)
}
