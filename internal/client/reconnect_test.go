package client_test

import (
	"context"
	"crypto/ed25519"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// gate is a proxy in front of a node that can play a cluster that is down
// (every request 503, as a restarting load balancer answers) and up.
type gate struct {
	up    atomic.Bool
	upAt  atomic.Int64 // unix nanos of the first request let through
	proxy *httputil.ReverseProxy
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !g.up.Load() {
		w.Header().Set("Retry-After", "3600") // a long wait asked for: /health still cuts it short
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	g.upAt.CompareAndSwap(0, time.Now().UnixNano())
	g.proxy.ServeHTTP(w, r)
}

func startGate(t *testing.T, n *testkit.Node) (*gate, string) {
	t.Helper()
	target, err := url.Parse(n.HTTPURL())
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{proxy: httputil.NewSingleHostReverseProxy(target)}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	return g, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

// After a full restart a client that has backed off for long does not
// wait it out: it probes /health and reconnects within about a second of
// the cluster answering.
func TestReconnectSoonAfterHealthAnswers(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	g, wsURL := startGate(t, n)
	c, err := client.New(client.Options{Identity: mesh.Members[0], URLs: []string{wsURL}, Logger: testkit.Logger(t),
		Backoff: client.Backoff{Min: 20 * time.Second, Max: 30 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(func() { _ = c.Close() })
	// The first attempt fails (503): the client now waits 10-20 s.
	testkit.Eventually(t, 5*time.Second, "first attempt failed", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		defer cancel()
		err := c.WaitReady(ctx)
		return err != nil && strings.Contains(err.Error(), "503")
	})
	up := time.Now()
	g.up.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("not reconnected within 5 s of /health answering (backoff 10-20 s): %v", err)
	}
	if took := time.Since(up); took > 3*time.Second {
		t.Fatalf("reconnected %s after the cluster came back", took)
	}
}

// A Retry-After on a refused upgrade sets the wait, instead of the
// backoff.
func TestRetryAfterHonoured(t *testing.T) {
	var upgrades atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" {
			upgrades.Add(1)
		}
		w.Header().Set("Retry-After", "1")
		http.Error(w, "busy", http.StatusTooManyRequests)
	}))
	t.Cleanup(srv.Close)
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := client.Dial(ctx, wsURL, nil)
	var he *client.HandshakeError
	if !errors.As(err, &he) || he.Status != http.StatusTooManyRequests || he.RetryAfter != time.Second {
		t.Fatalf("dial: %#v", err)
	}
	upgrades.Store(0)
	id := client.Identity{MeshID: "m", MemberID: "u", Priv: ed25519.NewKeyFromSeed(make([]byte, 32))}
	c, err := client.New(client.Options{Identity: id, URLs: []string{wsURL}, Logger: testkit.Logger(t),
		Backoff: client.Backoff{Min: 20 * time.Second, Max: 30 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(func() { _ = c.Close() })
	testkit.Eventually(t, 4*time.Second, "second attempt after Retry-After (backoff 10-20 s)", func() bool { return upgrades.Load() >= 2 })
}

// ListMembers pages through the whole mesh.
func TestListMembersPages(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), protocol.MaxMembersPage+3)
	c := newClient(t, client.Options{Identity: mesh.Members[0], URLs: []string{n.URL()}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ms, err := c.ListMembers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, m := range ms {
		seen[m.MemberID] = true
	}
	if len(ms) != len(mesh.Members) || len(seen) != len(mesh.Members) {
		t.Fatalf("listed %d members (%d distinct), want %d", len(ms), len(seen), len(mesh.Members))
	}
}

// A broker that answers and refuses (here: the mesh is full) is not
// retried early just because /health answers: the backoff holds.
func TestRefusalIsNotRetriedEarly(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxConnsPerMesh = 1 }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	c, err := client.New(client.Options{Identity: mesh.Members[1], URLs: []string{n.URL()}, Logger: testkit.Logger(t),
		Backoff: client.Backoff{Min: 20 * time.Second, Max: 30 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(func() { _ = c.Close() })
	testkit.Eventually(t, 5*time.Second, "refused for capacity", func() bool {
		return n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonCapacity) == 1
	})
	// The backoff is 10-20 s and /health answers all along: watch for 3 s
	// (an early retry would come after about one) that none comes.
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		if got := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonCapacity); got != 1 {
			t.Fatalf("%v capacity refusals, want 1: the client retried early", got)
		}
		select {
		case <-c.Done():
			t.Fatal("client stopped")
		case <-time.After(50 * time.Millisecond):
		}
	}
}
