// Package testkit starts real broker nodes for tests (in-process, real
// Postgres, real sockets) and gives them members with real keys.
package testkit

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

var nodeSeq atomic.Int64

// Config returns a node configuration with short timings for tests.
func Config(dbURL string) *config.Config {
	n := nodeSeq.Add(1)
	cfg := &config.Config{
		DatabaseURL: dbURL, Host: "127.0.0.1", Port: 0,
		NodeName:        "test-" + strconv.FormatInt(n, 10),
		ClusterBind:     "127.0.0.1:0",
		ClusterProfile:  "test",
		PresenceGrace:   90,
		HelloTimeout:    10 * time.Second,
		SweepInterval:   time.Second,
		LeaseDuration:   30 * time.Second,
		RevokeCheck:     time.Second,
		HelloRatePerSec: 10000,
		SendRatePerSec:  100000,
		// Unsigned hooks are taken only here (Node.HookURL).
		HookLocalAddr: "127.0.0.1:0",
	}
	cfg.Normalize()
	return cfg
}

// Options adjust a test node.
type Options struct {
	Configure     func(*config.Config)
	WrapTransport func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport
	Join          []*Node
	// Clock skews the node's wall clock (nil: time.Now).
	Clock func() time.Time
	// DBTracer traces the node's database connections (node.Options).
	DBTracer pgx.QueryTracer
}

// Node is a running test node.
type Node struct {
	*node.Node
	Registry *prometheus.Registry
	Config   *config.Config
}

// StartNode starts an in-process node on 127.0.0.1 with a free port; it is
// shut down when the test ends.
func StartNode(t testing.TB, dbURL string, o Options) *Node {
	t.Helper()
	cfg := Config(dbURL)
	if len(o.Join) > 0 {
		for _, j := range o.Join {
			cfg.ClusterJoin = append(cfg.ClusterJoin, j.GossipAddr())
		}
	}
	if o.Configure != nil {
		o.Configure(cfg)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n, err := node.Start(ctx, node.Options{Config: cfg, Logger: Logger(t), Registry: reg, Listener: ln, WrapTransport: o.WrapTransport, Clock: o.Clock,
		DBTracer: o.DBTracer, TestSignals: true})
	if err != nil {
		t.Fatalf("start node: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return &Node{Node: n, Registry: reg, Config: cfg}
}

// Counter reads a counter (or gauge) value from the node's registry;
// labels are name=value pairs.
func (n *Node) Counter(name string, labels ...string) float64 {
	mfs, err := n.Registry.Gather()
	if err != nil {
		return -1
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
		for _, m := range mf.GetMetric() {
			if !matchLabels(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
		return sum
	}
	return 0
}

func matchLabels(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Mesh is a mesh with members whose keys the test holds.
type Mesh struct {
	admin.MeshCreated
	Members []client.Identity
	Names   []string
}

// NewMesh creates a mesh with n members named p0, p1, …
func NewMesh(t testing.TB, st *store.Store, n int) *Mesh {
	t.Helper()
	ctx := context.Background()
	mc, err := admin.CreateMesh(ctx, st, "test mesh", "")
	if err != nil {
		t.Fatal(err)
	}
	m := &Mesh{MeshCreated: mc}
	for i := 0; i < n; i++ {
		m.AddMember(t, st, fmt.Sprintf("p%d", i))
	}
	return m
}

// AddMember enrols one more member.
func (m *Mesh) AddMember(t testing.TB, st *store.Store, name string) client.Identity {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := admin.AddMember(context.Background(), st, m.MeshID, hex.EncodeToString(pub), name, "member")
	if err != nil {
		t.Fatal(err)
	}
	id := client.Identity{MeshID: m.MeshID, MemberID: mem.ID, Priv: priv}
	m.Members = append(m.Members, id)
	m.Names = append(m.Names, name)
	return id
}

// Connect dials url and completes a hello; the connection closes when the
// test ends.
func Connect(t testing.TB, url string, id client.Identity, o client.HelloOptions) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	if _, err := c.Hello(ctx, id, o); err != nil {
		t.Fatalf("hello: %v", err)
	}
	return c
}

// Expect reads frames until one of type typ arrives (skipping others) or
// the timeout passes.
func Expect(t testing.TB, c *client.Conn, typ string, timeout time.Duration) client.Frame {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for %q: %v", typ, err)
		}
		if f.Type == typ {
			return f
		}
	}
}

// ExpectPush waits for the next envelope push (system events skipped).
func ExpectPush(t testing.TB, c *client.Conn, timeout time.Duration) protocol.Push {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		f := Expect(t, c, protocol.TypePush, time.Until(deadline))
		var p protocol.Push
		if err := f.Decode(&p); err != nil {
			t.Fatal(err)
		}
		if p.Subtype == "" {
			return p
		}
	}
}

// Eventually retries cond until it holds or timeout passes (polling every
// 20 ms): for state that converges asynchronously, such as gossip.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// StartCluster starts n nodes on one database, each gossiping on its own
// loopback address (127.0.0.11, .12, …) so that tests can partition them by
// IP, and waits until every node sees all the others.
func StartCluster(t testing.TB, dbURL string, n int, o Options) []*Node {
	t.Helper()
	var nodes []*Node
	for i := 0; i < n; i++ {
		oi := o
		ip := fmt.Sprintf("127.0.0.%d", 11+i)
		configure := o.Configure
		oi.Configure = func(c *config.Config) {
			c.Host = ip
			c.ClusterBind = ip + ":0"
			if configure != nil {
				configure(c)
			}
		}
		if i > 0 {
			oi.Join = nodes[:1]
		}
		nodes = append(nodes, StartNode(t, dbURL, oi))
	}
	Eventually(t, 10*time.Second, "cluster membership", func() bool {
		for _, x := range nodes {
			if x.Cluster().NumMembers() != n {
				return false
			}
		}
		return true
	})
	return nodes
}

// HTTPClientFrom is an HTTP client whose connections leave from localIP (a
// loopback address such as 127.0.0.21), so that tests can be several
// clients, each with an address of its own. Pass it as
// client.DialOptions.HTTPClient for WebSockets.
func HTTPClientFrom(t testing.TB, localIP string) *http.Client {
	t.Helper()
	ip := net.ParseIP(localIP)
	if ip == nil {
		t.Fatalf("HTTPClientFrom: %q is not an IP address", localIP)
	}
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: ip}}
	tr := &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 64}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// TCPForward is a same-host TCP forwarder to target, as socat, ssh -L or
// a sidecar would be: it adds no header and its connections to target come
// from 127.0.0.1. It returns its address; it stops when the test ends.
func TCPForward(t testing.TB, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	track := func(c net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		if open == nil {
			return false
		}
		open = append(open, c)
		return true
	}
	open = []net.Conn{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.DialTimeout("tcp", target, 5*time.Second)
			if err != nil {
				_ = in.Close()
				continue
			}
			if !track(in) || !track(out) {
				_ = in.Close()
				_ = out.Close()
				return
			}
			wg.Add(2)
			pipe := func(dst, src net.Conn) {
				defer wg.Done()
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}
			go pipe(out, in)
			go pipe(in, out)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		conns := open
		open = nil
		mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
		wg.Wait()
	})
	return ln.Addr().String()
}
