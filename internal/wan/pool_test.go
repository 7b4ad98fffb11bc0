package wan_test

import (
	"context"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/wan"
)

// connectWatch counts the connections a store opens, by application_name.
type connectWatch struct {
	mu    sync.Mutex
	byApp map[string]int
}

func (w *connectWatch) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (w *connectWatch) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (w *connectWatch) TraceConnectStart(ctx context.Context, d pgx.TraceConnectStartData) context.Context {
	w.mu.Lock()
	w.byApp[d.ConnConfig.RuntimeParams["application_name"]]++
	w.mu.Unlock()
	return ctx
}

func (w *connectWatch) TraceConnectEnd(context.Context, pgx.TraceConnectEndData) {}

func (w *connectWatch) reset() {
	w.mu.Lock()
	w.byApp = map[string]int{}
	w.mu.Unlock()
}

func (w *connectWatch) count(app string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.byApp[app]
}

// While the path to Postgres is cut (blackholed), the health check's
// probes time out, and pgx closes a connection whose query it abandoned:
// they close only the probe's own, none of the pools'. The pools have
// nothing to reopen: Warm after the heal opens no connection, and the
// probe's connection is back.
func TestCutClosesNoPoolConnection(t *testing.T) {
	db := pgtest.NewDB(t)
	u, err := url.Parse(db)
	if err != nil {
		t.Fatal(err)
	}
	p, err := wan.NewProxy(wan.ProxyOptions{Listen: "127.0.0.1:0", Target: u.Host})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	via := *u
	via.Host = p.Addr()
	w := &connectWatch{byApp: map[string]int{}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := store.Open(ctx, via.String(), 8, store.WithTracer(w))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	w.reset()

	p.Cut()
	for range 3 {
		pctx, pcancel := context.WithTimeout(ctx, 100*time.Millisecond)
		_, err := s.Now(pctx)
		pcancel()
		if err == nil {
			t.Fatal("the health check answered through a cut path")
		}
	}
	p.Heal()
	if _, err := s.Now(ctx); err != nil {
		t.Fatalf("the health check after the heal: %v", err)
	}
	if err := s.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.MeshMembers(ctx, "none"); err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"claudemesh-broker", "claudemesh-broker-async"} {
		if n := w.count(app); n != 0 {
			t.Errorf("%s: %d connections opened over the cut, want none", app, n)
		}
	}
	if n := w.count("claudemesh-broker-probe"); n == 0 {
		t.Error("the probe's connection was not reopened: its timeouts did not close it (the test proves nothing)")
	}
}
