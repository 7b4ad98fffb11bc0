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

// A connection keeps the generic plan of its first run of a statement. The
// delivery mark's must stay one primary-key probe per key when that first
// run found the table nearly empty and it then grew: the plan it had
// walked every pending row for every key (21 s for 4,096 keys over 20,000
// rows in a burst).
func TestMarkPlanSurvivesGrowth(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range store.SessionSettings() {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	sql := store.HotStatements()["mark delivered"]
	if sql == "" {
		t.Fatal("no mark statement")
	}
	if _, err := conn.Exec(ctx, `PREPARE mark(int8[], text[], text) AS `+sql); err != nil {
		t.Fatal(err)
	}
	fill := func(from, to int) {
		t.Helper()
		_, err := conn.Exec(ctx, `INSERT INTO delivery (message_id, recipient_member_id, priority, expires_at)
			SELECT g, 'member-' || (g % 100), 1, now() + interval '1 day' FROM generate_series($1::int, $2::int) g`, from, to)
		if err != nil {
			t.Fatal(err)
		}
	}
	fill(1, 50)
	if _, err := conn.Exec(ctx, `EXECUTE mark('{1}', '{member-1}', 'n1')`); err != nil { // the generic plan is made here
		t.Fatal(err)
	}
	fill(51, 20000)
	var plan string
	rows, err := conn.Query(ctx, `EXPLAIN (COSTS OFF) EXECUTE mark('{2,3}', '{member-2,member-3}', 'n1')`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		plan += line + "\n"
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plan, "Join Filter") || !strings.Contains(plan, "Index Cond: ((message_id = a.mid) AND (recipient_member_id = a.member))") {
		t.Fatalf("the mark does not probe per key:\n%s", plan)
	}
}
