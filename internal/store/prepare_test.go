package store_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
)

// poolWatch is a tracer on a store's pools that counts the connections
// they open and records the statements they prepare, from reset on.
type poolWatch struct {
	mu       sync.Mutex
	connects int
	prepared []string
}

type prepareKey struct{}

func (w *poolWatch) reset() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.connects, w.prepared = 0, nil
}

func (w *poolWatch) seen() (connects int, prepared []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.connects, append([]string(nil), w.prepared...)
}

func (w *poolWatch) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (w *poolWatch) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (w *poolWatch) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	w.mu.Lock()
	w.connects++
	w.mu.Unlock()
	return ctx
}

func (w *poolWatch) TraceConnectEnd(context.Context, pgx.TraceConnectEndData) {}

func (w *poolWatch) TracePrepareStart(ctx context.Context, _ *pgx.Conn, d pgx.TracePrepareStartData) context.Context {
	return context.WithValue(ctx, prepareKey{}, d.SQL)
}

func (w *poolWatch) TracePrepareEnd(ctx context.Context, _ *pgx.Conn, d pgx.TracePrepareEndData) {
	if d.AlreadyPrepared {
		return
	}
	sql, _ := ctx.Value(prepareKey{}).(string)
	w.mu.Lock()
	w.prepared = append(w.prepared, strings.Join(strings.Fields(sql), " "))
	w.mu.Unlock()
}

func openWatched(t *testing.T, url string) (*store.Store, *poolWatch) {
	t.Helper()
	w := &poolWatch{}
	s, err := store.Open(context.Background(), url, 20, store.WithTracer(w))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s, w
}

func warm(t *testing.T, s *store.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Warm(ctx); err != nil {
		t.Fatal(err)
	}
}

// hotPaths runs, once each, every store method that a peer's request
// waits for: a hello (the mesh's members, a member by key, the hello's
// record, and the lookup that records it), sends (one repeats another's client_message_id, which looks the
// first up), a claim (of the sends, and of rows left by an earlier run), a
// delivery mark, a lease release and a wake-up.
func hotPaths(t *testing.T, s *store.Store, f fixture, tag string) {
	t.Helper()
	ctx := context.Background()
	if _, err := s.MeshMembers(ctx, f.mesh.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MemberByPubkey(ctx, f.mesh.ID, f.members[1].Pubkey); err != nil {
		t.Fatal(err)
	}
	hello := store.HelloCheck{SigHash: []byte("sig-" + tag), PID: 7, Cwd: "/w", MeshID: f.mesh.ID, Pubkey: f.members[1].Pubkey}
	if res, err := s.AcceptHellos(ctx, time.Minute, time.Minute, []store.HelloCheck{hello}); err != nil || !res[0].Fresh {
		t.Fatalf("hello: %+v, %v", res, err)
	}
	// The hello of a member the node has not cached: lookup and record.
	hello.SigHash = []byte("sig-member-" + tag)
	if _, recorded, res, err := s.MemberHello(ctx, time.Minute, time.Minute, true, f.members[1].ID, hello); err != nil || !recorded || !res.Fresh {
		t.Fatalf("member hello: %v %+v, %v", recorded, res, err)
	}
	var ids []int64
	for range 2 {
		res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{msg(f, 0, 1, 1, "cm-"+tag)}})
		if err != nil || res[0].Err != nil {
			t.Fatalf("send: %+v, %v", res, err)
		}
		ids = append(ids, res[0].ID)
	}
	if ids[0] != ids[1] {
		t.Fatalf("the repeated send got id %d, the first %d", ids[1], ids[0])
	}
	if _, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{msg(f, 0, 1, 1, "")}}); err != nil {
		t.Fatal(err)
	}
	rows, err := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: f.members[1].ID, Conn: "c-" + tag, MaxPriority: 2, Limit: 10}}})
	if err != nil || len(rows) < 2 {
		t.Fatalf("claim: %d rows, %v", len(rows), err)
	}
	if _, err := s.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{{MessageID: rows[0].MessageID, MemberID: rows[0].MemberID}}}); err != nil {
		t.Fatal(err)
	}
	if n, err := s.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c-" + tag, Keys: []delivery.Key{{MessageID: rows[1].MessageID, MemberID: rows[1].MemberID}}}); err != nil || n != 1 {
		t.Fatalf("release: %d, %v", n, err)
	}
	if err := s.Notify(ctx, []string{"cm_test"}, []string{tag}); err != nil {
		t.Fatal(err)
	}
}

// Once Warm returns, the hot paths neither open a connection nor prepare
// a statement: every statement they run was prepared when its connection
// opened. A statement that a hot path runs and nobody declared hot (or
// declared for the other pool) fails this test. The statement of a method
// off the hot paths is prepared on first use, and the watch sees it: the
// test can tell.
func TestHotPathsPrepared(t *testing.T) {
	s, w := openWatched(t, pgtest.NewDB(t))
	f := seed(t, s, 2)
	warm(t, s)
	w.reset()
	hotPaths(t, s, f, "1")
	if connects, prepared := w.seen(); connects != 0 || len(prepared) != 0 {
		t.Fatalf("the hot paths opened %d connections and prepared %d statements: %q", connects, len(prepared), prepared)
	}
	if _, err := s.GetMesh(context.Background(), f.mesh.ID); err != nil {
		t.Fatal(err)
	}
	if _, prepared := w.seen(); len(prepared) != 1 || !strings.Contains(prepared[0], "FROM mesh WHERE id = $1") {
		t.Fatalf("GetMesh's first use: prepared %q, want its statement", prepared)
	}
}

// Every hot statement is one Postgres prepares: the pools skip one it
// refuses (so that a connection still serves the rest), which would leave
// it to be prepared on each use.
func TestHotStatementsValid(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.NewDB(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	hot := store.HotStatements()
	if len(hot) < 9 {
		t.Fatalf("%d hot statements, want at least the 9 of the hello, send, claim, mark, release and wake-up", len(hot))
	}
	for name, sql := range hot {
		if _, err := conn.Prepare(ctx, name, sql); err != nil {
			t.Errorf("hot statement %q: %v", name, err)
		}
	}
}

// Terminating the pools' backends, as a Postgres restart does, leaves
// each pool with connections closed under it. Warm drops them and reopens
// the pools; the hot paths then find every connection open and prepared.
func TestWarmReplacesClosedConnections(t *testing.T) {
	url := pgtest.NewDB(t)
	s, w := openWatched(t, url)
	f := seed(t, s, 2)
	warm(t, s)
	hotPaths(t, s, f, "before")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var pids []int32
	err = admin.QueryRow(ctx, `SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity
		WHERE datname = current_database() AND application_name IN ('claudemesh-broker', 'claudemesh-broker-async')
		  AND pg_terminate_backend(pid)`).Scan(&pids)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 20 {
		t.Fatalf("terminated %d backends, want the pools' 20", len(pids))
	}
	// pg_terminate_backend only signals: wait until the backends are gone
	// and their sockets closed, as they are once a restarted Postgres
	// serves again.
	for left := len(pids); left > 0; {
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, pids).Scan(&left); err != nil {
			t.Fatalf("%d terminated backends still there: %v", left, err)
		}
		if left > 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}

	w.reset()
	warm(t, s)
	if connects, _ := w.seen(); connects != 20 {
		t.Fatalf("Warm opened %d connections, want the 20 closed ones replaced", connects)
	}
	w.reset()
	hotPaths(t, s, f, "after")
	if connects, prepared := w.seen(); connects != 0 || len(prepared) != 0 {
		t.Fatalf("after Warm, the hot paths opened %d connections and prepared %d statements: %q", connects, len(prepared), prepared)
	}
}

// Warm answers at once, with the connection error, when Postgres cannot
// be reached; it does not wait out its context.
func TestWarmPostgresDown(t *testing.T) {
	s, err := store.Open(context.Background(), "postgres://nobody@127.0.0.1:1/none?connect_timeout=5", 4)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = s.Warm(ctx)
	if err == nil || errors.Is(err, context.DeadlineExceeded) || !store.IsUnavailable(err) {
		t.Fatalf("Warm with Postgres down: %v, want a connection error", err)
	}
}
