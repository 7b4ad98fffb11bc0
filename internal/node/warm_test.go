package node_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// requestWatch is a tracer on a node's pools that records what the
// statements run for the watched peers waited for: a connection opened
// for them (the pool had none open to give), or a prepare before the
// statement itself. A statement is the peers' when its arguments name
// their mesh or one of them, as every statement of their hellos and sends
// does, and none of the node's periodic work but the revocation check
// (which the tests put off).
type requestWatch struct {
	mu     sync.Mutex
	names  []string
	dialed map[*pgx.Conn]bool // opened within an Acquire, not used or released since
	ran    int                // the peers' statements
	waits  []string
}

type (
	acquireKey struct{}
	peerKey    struct{}
	dialFlag   struct{ dialed bool } // guarded by requestWatch.mu
)

func newRequestWatch() *requestWatch { return &requestWatch{dialed: map[*pgx.Conn]bool{}} }

// watch starts recording the statements that name one of names.
func (w *requestWatch) watch(names ...string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.names, w.ran, w.waits = names, 0, nil
}

func (w *requestWatch) result() (ran int, waits []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ran, append([]string(nil), w.waits...)
}

func (w *requestWatch) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	return context.WithValue(ctx, acquireKey{}, &dialFlag{})
}

func (w *requestWatch) TraceAcquireEnd(ctx context.Context, _ *pgxpool.Pool, d pgxpool.TraceAcquireEndData) {
	f, _ := ctx.Value(acquireKey{}).(*dialFlag)
	w.mu.Lock()
	defer w.mu.Unlock()
	if f != nil && f.dialed && d.Conn != nil {
		w.dialed[d.Conn] = true
	}
}

// TraceRelease forgets a dial when the acquirer that caused it gives the
// connection back: the next acquirer gets it opened and prepared (the
// store's Warm pings on a connection it may have had to open, and Ping runs
// no traced query).
func (w *requestWatch) TraceRelease(_ *pgxpool.Pool, d pgxpool.TraceReleaseData) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.dialed, d.Conn)
}

func (w *requestWatch) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	if f, _ := ctx.Value(acquireKey{}).(*dialFlag); f != nil {
		w.mu.Lock()
		f.dialed = true
		w.mu.Unlock()
	}
	return ctx
}

func (w *requestWatch) TraceConnectEnd(context.Context, pgx.TraceConnectEndData) {}

func (w *requestWatch) TraceQueryStart(ctx context.Context, c *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	w.mu.Lock()
	defer w.mu.Unlock()
	dialed := w.dialed[c]
	delete(w.dialed, c)
	if !w.mentions(d.Args) {
		return ctx
	}
	w.ran++
	if dialed {
		w.waits = append(w.waits, "a connection opened for: "+oneLine(d.SQL))
	}
	return context.WithValue(ctx, peerKey{}, d.SQL)
}

func (w *requestWatch) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (w *requestWatch) TracePrepareStart(ctx context.Context, _ *pgx.Conn, _ pgx.TracePrepareStartData) context.Context {
	return ctx
}

func (w *requestWatch) TracePrepareEnd(ctx context.Context, _ *pgx.Conn, d pgx.TracePrepareEndData) {
	sql, peer := ctx.Value(peerKey{}).(string)
	if !peer || d.AlreadyPrepared {
		return
	}
	w.mu.Lock()
	w.waits = append(w.waits, "a prepare of: "+oneLine(sql))
	w.mu.Unlock()
}

// mentions reports whether args name one of the watched names. Guarded by mu.
func (w *requestWatch) mentions(args []any) bool {
	if len(w.names) == 0 {
		return false
	}
	s := fmt.Sprintf("%v", args)
	for _, n := range w.names {
		if strings.Contains(s, n) {
			return true
		}
	}
	return false
}

func oneLine(sql string) string {
	s := strings.Join(strings.Fields(sql), " ")
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// quiet puts off the node's revocation check, the one periodic statement
// that names the peers (their member ids).
func quiet(c *config.Config) { c.RevokeCheck = time.Hour }

// firstRequests connects two members (their first hellos: the mesh's
// members, the hello's record), sends from one to the other (the insert)
// and waits for the push (the claim of the recipient's session).
func firstRequests(t *testing.T, n *testkit.Node, mesh *testkit.Mesh, from, to int) {
	t.Helper()
	a := testkit.Connect(t, n.URL(), mesh.Members[from], client.HelloOptions{})
	b := testkit.Connect(t, n.URL(), mesh.Members[to], client.HelloOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := a.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, TargetSpec: mesh.Members[to].Pubkey(), Priority: "now",
		Nonce: "bm9uY2U=", Ciphertext: "aGk="})
	if err != nil {
		t.Fatal(err)
	}
	var ack protocol.Ack
	if err := testkit.Expect(t, a, protocol.TypeAck, 10*time.Second).Decode(&ack); err != nil || !ack.Queued {
		t.Fatalf("send: %+v, %v", ack, err)
	}
	testkit.ExpectPush(t, b, 10*time.Second)
}

func checkNoWaits(t *testing.T, w *requestWatch, what string) {
	t.Helper()
	ran, waits := w.result()
	if ran < 3 {
		t.Fatalf("%s: the watch saw %d of the peers' statements, want their hellos' and the send's", what, ran)
	}
	if len(waits) > 0 {
		t.Fatalf("%s: %d of the peers' statements waited for set-up:\n%s", what, len(waits), strings.Join(waits, "\n"))
	}
}

// A node serves its first hellos and its first send without opening a
// connection or preparing a statement for them: node.Start returned with
// the pools open and prepared. The watch does see a prepare, for a
// statement that is not prepared ahead.
func TestFirstRequestsPayNoSetUp(t *testing.T) {
	w := newRequestWatch()
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{DBTracer: w, Configure: quiet})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	w.watch(mesh.MeshID, mesh.Members[0].MemberID, mesh.Members[1].MemberID)
	firstRequests(t, n, mesh, 0, 1)
	checkNoWaits(t, w, "first requests")

	if _, err := n.Store().MessageStatus(context.Background(), mesh.MeshID, 1); err != nil {
		t.Fatal(err)
	}
	if _, waits := w.result(); len(waits) != 1 || !strings.Contains(waits[0], "a prepare of: SELECT mesh_id, sender_member_id, priority FROM message") {
		t.Fatalf("a statement not prepared ahead: the watch saw %q", waits)
	}
}

func health(t *testing.T, n *testkit.Node) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.HTTPURL()+"/health", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Postgres restarts under a node: every pooled connection is closed under
// it. By the time /health reports 200 again the pools have all their
// connections open again (Postgres counts them) and prepared: the hellos
// and the send that follow open no connection and prepare no statement.
func TestPoolWarmBeforeHealthyAfterRestart(t *testing.T) {
	pg := faultkit.PrivatePostgres(t)
	w := newRequestWatch()
	n := testkit.StartNode(t, pg.URL("postgres"), testkit.Options{DBTracer: w, Configure: quiet})
	mesh := testkit.NewMesh(t, n.Store(), 4)
	firstRequests(t, n, mesh, 0, 1)

	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "/health 503", func() bool { return health(t, n) == http.StatusServiceUnavailable })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	admin, err := pgx.Connect(ctx, pg.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	testkit.Eventually(t, 30*time.Second, "/health 200", func() bool { return health(t, n) == http.StatusOK })
	var open int
	err = admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE application_name IN ('claudemesh-broker', 'claudemesh-broker-async')`).Scan(&open)
	if err != nil {
		t.Fatal(err)
	}
	if open != n.Config.DBPoolSize {
		t.Fatalf("/health 200 with %d of the pools' %d connections open", open, n.Config.DBPoolSize)
	}

	w.watch(mesh.MeshID, mesh.Members[2].MemberID, mesh.Members[3].MemberID)
	firstRequests(t, n, mesh, 2, 3)
	checkNoWaits(t, w, "requests once /health was 200 again")
}

// The first hello of a mesh the node has not cached runs one statement:
// the lookup of the mesh's members records the hello. The next hello of
// the mesh finds its member in memory and runs one too (its record). The
// watch counts the statements that name the hello's key (the claim that
// follows a hello names its member).
func TestFirstHelloOneStatement(t *testing.T) {
	w := newRequestWatch()
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{DBTracer: w, Configure: quiet})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	for i := range 2 {
		w.watch(mesh.MeshID, mesh.Members[i].Pubkey())
		testkit.Connect(t, n.URL(), mesh.Members[i], client.HelloOptions{})
		if ran, waits := w.result(); ran != 1 || len(waits) != 0 {
			t.Fatalf("hello %d: %d statements (%q waited for set-up), want 1", i, ran, waits)
		}
	}
}
