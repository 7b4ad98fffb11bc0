package wan

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// Options configure a Cluster.
type Options struct {
	// Topology is the simulated network; no regions means DefaultTopology.
	Topology Topology
	// Profile is each node's CLUSTER_PROFILE; empty means "wan".
	Profile string
	// Configure adjusts a node's configuration before it starts.
	Configure func(region string, c *config.Config)
	// Members are enrolled in the mesh before the nodes start, so that no
	// node touches Postgres for them before it is measured. Zero means 100.
	Members int
	// DBTracer, when set, traces the store connections of region's node
	// (node.Options.DBTracer); nil for none.
	DBTracer func(region string) pgx.QueryTracer
}

// Node is one region's broker node and the paths around it.
type Node struct {
	*testkit.Node
	Region Region
	// Postgres is the node's path to Postgres (delayed by the one-way
	// delay between the regions); Cut it to take Postgres away.
	Postgres *Proxy
	// Clients is the peers' path to the node; nil when peers connect
	// directly (Topology.Client is zero).
	Clients *Proxy
	// Gossip delays the node's gossip; Partition, around it, cuts it.
	Gossip    *DelayTransport
	Partition *faultkit.Partition
	// Started is when node.Start returned.
	Started time.Time
}

// PeerURL is the WebSocket URL a peer in the node's region uses.
func (n *Node) PeerURL() string {
	if n.Clients != nil {
		return "ws://" + n.Clients.Addr() + "/ws"
	}
	return n.URL()
}

// Healthy asks the node's /health (directly, not through the peers' path)
// whether it reports Postgres up.
func (n *Node) Healthy(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.HTTPURL()+"/health", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Cluster is one node per region on one Postgres, with the simulated
// network between them, and a mesh whose members' keys the test holds.
type Cluster struct {
	T     Topology
	Wire  Wire
	Nodes []*Node // in the topology's region order
	Mesh  *testkit.Mesh
	// Admin is a store on the real database, outside the simulated
	// network, for setting up and checking.
	Admin   *store.Store
	Profile string

	next int // members handed out
}

// Start builds the cluster on database db and waits until every node sees
// every other one. Everything stops when the test ends.
func Start(t testing.TB, db string, o Options) *Cluster {
	t.Helper()
	topo := o.Topology
	if len(topo.Regions) == 0 {
		topo = DefaultTopology()
	}
	if err := topo.Validate(); err != nil {
		t.Fatal(err)
	}
	if o.Profile == "" {
		o.Profile = "wan"
	}
	if o.Members == 0 {
		o.Members = 100
	}
	pgURL, err := url.Parse(db)
	if err != nil {
		t.Fatalf("wan: database URL: %v", err)
	}
	admin, err := store.Open(context.Background(), db, 4)
	if err != nil {
		t.Fatalf("wan: open the database: %v", err)
	}
	t.Cleanup(admin.Close)
	c := &Cluster{T: topo, Wire: Wire{T: topo}, Admin: admin, Profile: o.Profile}
	c.Mesh = testkit.NewMesh(t, admin, o.Members)
	// Runs after every node's shutdown (cleanups run last first).
	t.Cleanup(func() {
		if !waitUntil(probeLinger, func() bool { return !memberlistProbing() }) {
			t.Errorf("wan: memberlist probes still running %s after the nodes stopped", probeLinger)
		}
	})

	for i, r := range topo.Regions {
		n := &Node{Region: r}
		d := topo.Delay(r.Name, topo.Postgres)
		n.Postgres = startProxy(t, ProxyOptions{Listen: net.JoinHostPort(r.IP, "0"), Target: pgURL.Host, Up: d, Down: d, Handshake: !topo.NoHandshake})
		viaProxy := *pgURL
		viaProxy.Host = n.Postgres.Addr()

		cfg := &config.Config{
			DatabaseURL: viaProxy.String(), Host: r.IP, Port: 0, NodeName: r.Name,
			ClusterBind: net.JoinHostPort(r.IP, "0"), ClusterProfile: o.Profile,
			// Every peer of the harness comes from one address; in the
			// field they come from many.
			HelloRatePerSec: 10000, SendRatePerSec: 100000,
		}
		if i > 0 {
			cfg.ClusterJoin = []string{c.Nodes[0].GossipAddr()}
		}
		cfg.Normalize()
		if o.Configure != nil {
			o.Configure(r.Name, cfg)
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(r.IP, "0"))
		if err != nil {
			t.Fatalf("wan: listen in %s: %v", r.Name, err)
		}
		reg := prometheus.NewRegistry()
		var tracer pgx.QueryTracer
		if o.DBTracer != nil {
			tracer = o.DBTracer(r.Name)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		nd, err := node.Start(ctx, node.Options{
			Config: cfg, Logger: testkit.Logger(t), Registry: reg, Listener: ln, SkipMigrate: true, DBTracer: tracer,
			WrapTransport: func(tr memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
				n.Gossip = NewDelayTransport(tr, topo, r.Name)
				n.Partition = faultkit.NewPartition(n.Gossip)
				return n.Partition
			},
		})
		cancel()
		if err != nil {
			t.Fatalf("wan: start the %s node: %v", r.Name, err)
		}
		n.Started = time.Now()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			n.Postgres.Heal()
			_ = nd.Shutdown(ctx)
		})
		n.Node = &testkit.Node{Node: nd, Registry: reg, Config: cfg}
		if topo.Client > 0 {
			n.Clients = startProxy(t, ProxyOptions{Listen: net.JoinHostPort(r.IP, "0"), Target: nd.Addr(),
				Up: topo.Client, Down: topo.Client, Handshake: !topo.NoHandshake})
		}
		c.Nodes = append(c.Nodes, n)
	}
	if !c.WaitMembers(30*time.Second, len(c.Nodes)) {
		t.Fatalf("wan: the %d nodes did not all see each other within 30 s", len(c.Nodes))
	}
	return c
}

func startProxy(t testing.TB, o ProxyOptions) *Proxy {
	t.Helper()
	p, err := NewProxy(o)
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the node's cleanup, so it runs after it.
	t.Cleanup(func() { p.Close() })
	return p
}

// Node returns the node of region name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Region.Name == name {
			return n
		}
	}
	panic(fmt.Sprintf("wan: no region %q", name))
}

// WaitMembers waits until every node's gossip view has want live members.
func (c *Cluster) WaitMembers(timeout time.Duration, want int) bool {
	return waitUntil(timeout, func() bool {
		for _, n := range c.Nodes {
			if n.Cluster().NumMembers() != want {
				return false
			}
		}
		return true
	})
}

// CutGossip cuts all gossip between region name and the others (both
// ways); Postgres and peers are not affected.
func (c *Cluster) CutGossip(name string) {
	isolated := c.Node(name)
	for _, n := range c.Nodes {
		if n == isolated {
			continue
		}
		n.Partition.Block(isolated.Region.IP)
		isolated.Partition.Block(n.Region.IP)
	}
}

// DetectorCounts sums, over the nodes, the deaths they declared and the
// times a node stopped answering one of them (presence.Stats).
func (c *Cluster) DetectorCounts() (deaths, unreachable uint64) {
	for _, n := range c.Nodes {
		st := n.Cluster().Stats()
		deaths += st.Deaths
		unreachable += st.Unreachable
	}
	return deaths, unreachable
}

// HealGossip restores all gossip.
func (c *Cluster) HealGossip() {
	for _, n := range c.Nodes {
		n.Partition.Heal()
	}
}

// probeLinger bounds how long memberlist's probe goroutines outlive
// Shutdown: it does not wait for them, and each waits out its probe
// timeout (3 s in the WAN profile) and the TCP fallback's deadline (the
// probe interval, 5 s).
const probeLinger = 10 * time.Second

// memberlistProbing reports whether a goroutine of a memberlist probe is
// still running, so that a test ends only when they are gone (the leak
// check after the package's tests would find them).
func memberlistProbing() bool {
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	return bytes.Contains(buf[:n], []byte("memberlist.(*Memberlist).probeNode"))
}

// waitUntil polls cond every 10 ms until it holds or timeout passes: for
// state of the cluster that converges without telling anyone (gossip
// views, replicas).
func waitUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}
