package devcluster_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/devcluster"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func startLB(t *testing.T, interval time.Duration, backends ...devcluster.Backend) *devcluster.LB {
	t.Helper()
	lb, err := devcluster.StartLB(devcluster.LBOptions{
		Addr: "127.0.0.1:0", Backends: backends, CheckInterval: interval, Logger: testkit.Logger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := lb.Close(ctx); err != nil {
			t.Errorf("close lb: %v", err)
		}
	})
	return lb
}

func backendOf(n *testkit.Node) devcluster.Backend {
	return devcluster.Backend{Name: n.Name(), URL: n.HTTPURL()}
}

// hello connects through url and returns the connection and the node that
// accepted it.
func hello(t *testing.T, url string, id client.Identity) (*client.Conn, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	ack, err := c.Hello(ctx, id, client.HelloOptions{})
	if err != nil {
		t.Fatalf("hello through the lb: %v", err)
	}
	return c, ack.Node
}

// Sequential WebSockets through the LB go round-robin to every node,
// envelopes flow through the proxied sockets both ways, and when a node
// stops, new connections land on the others at once: the failed dial marks
// the node down and the upgrade is retried elsewhere, without waiting for
// a health check (the interval here is an hour).
func TestLBRoundRobinAndFailover(t *testing.T) {
	db := pgtest.NewDB(t)
	a := testkit.StartNode(t, db, testkit.Options{})
	b := testkit.StartNode(t, db, testkit.Options{Join: []*testkit.Node{a}})
	c := testkit.StartNode(t, db, testkit.Options{Join: []*testkit.Node{a}})
	testkit.Eventually(t, 10*time.Second, "3-node cluster", func() bool {
		return a.Cluster().NumMembers() == 3 && b.Cluster().NumMembers() == 3 && c.Cluster().NumMembers() == 3
	})
	lb := startLB(t, time.Hour, backendOf(a), backendOf(b), backendOf(c))
	mesh := testkit.NewMesh(t, a.Store(), 2)
	alice, bob := mesh.Members[0], mesh.Members[1]

	recv, recvNode := hello(t, lb.URL(), bob)
	send, sendNode := hello(t, lb.URL(), alice)
	_, thirdNode := hello(t, lb.URL(), alice)
	got := []string{recvNode, sendNode, thirdNode}
	slices.Sort(got)
	want := []string{a.Name(), b.Name(), c.Name()}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("three connections landed on %v, want one on each of %v", got, want)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := send.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: "c-1", TargetSpec: bob.Pubkey(),
		Priority: "now", Nonce: "bm9uY2U=", Ciphertext: "dGhyb3VnaCB0aGUgbGI="}); err != nil {
		t.Fatal(err)
	}
	var ack protocol.Ack
	if err := testkit.Expect(t, send, protocol.TypeAck, 5*time.Second).Decode(&ack); err != nil || !ack.Queued {
		t.Fatalf("ack = %+v, %v", ack, err)
	}
	if p := testkit.ExpectPush(t, recv, 10*time.Second); p.Ciphertext != "dGhyb3VnaCB0aGUgbGI=" || p.SenderPubkey != alice.Pubkey() {
		t.Fatalf("push through the lb = %+v", p)
	}

	sctx, scancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer scancel()
	if err := a.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		if _, node := hello(t, lb.URL(), alice); node == a.Name() {
			t.Fatalf("connection %d landed on the stopped node %s", i, node)
		}
	}
	if h := lb.Healthy(); !slices.Equal(h, []string{b.Name(), c.Name()}) {
		t.Fatalf("healthy backends after %s stopped = %v", a.Name(), h)
	}
}

// fakeNode answers /health with a switchable status and counts every other
// request it gets.
type fakeNode struct {
	healthy atomic.Bool
	hits    atomic.Int64
}

func (f *fakeNode) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/health" {
		if !f.healthy.Load() {
			http.Error(w, `{"status":"degraded"}`, http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, `{"status":"ok","node":"fake"}`)
		return
	}
	f.hits.Add(1)
	_, _ = io.WriteString(w, `{"node":"fake"}`)
}

// A node whose /health fails gets no traffic although it accepts
// connections; it gets its share again once its health check passes, and
// loses it when the check fails again.
func TestLBSkipsNodeFailingHealth(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	fake := &fakeNode{}
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	lb := startLB(t, 20*time.Millisecond, backendOf(n), devcluster.Backend{Name: "fake", URL: srv.URL})

	nodeOf := func() string {
		resp, err := http.Get(lb.HTTPURL() + "/health")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var h struct{ Node string }
		if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
			t.Fatalf("health through the lb: %v", err)
		}
		return h.Node
	}
	for i := 0; i < 8; i++ {
		if got := nodeOf(); got != n.Name() {
			t.Fatalf("request %d went to %q while its health check fails", i, got)
		}
	}
	if fake.hits.Load() != 0 {
		t.Fatalf("the unhealthy node got %d requests", fake.hits.Load())
	}

	fake.healthy.Store(true)
	testkit.Eventually(t, 5*time.Second, "the recovered node to get traffic", func() bool { return nodeOf() == "fake" })

	fake.healthy.Store(false)
	testkit.Eventually(t, 5*time.Second, "the failing node to be taken out", func() bool {
		return slices.Equal(lb.Healthy(), []string{n.Name()})
	})
	before := fake.hits.Load()
	for i := 0; i < 8; i++ {
		if got := nodeOf(); got != n.Name() {
			t.Fatalf("request %d went to %q after its health check failed again", i, got)
		}
	}
	if fake.hits.Load() != before {
		t.Fatal("the node failing its health check still got requests")
	}
}
