// Package devcluster is `broker dev`: a private Postgres from the machine's
// server binaries, migrations, a demo mesh, and N broker nodes gossiping on
// loopback, all in one process.
package devcluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/pgembed"
	"github.com/claudemesh/broker/internal/store"
)

// Options configure a dev cluster.
type Options struct {
	Nodes      int    // default 3
	DataDir    string // default .data
	BasePort   int    // first node's HTTP port; default BROKER_PORT or 7900
	GossipPort int    // first node's gossip port; default 7946
	PGPort     int    // 0: a free port
	LBPort     int    // load balancer in front of the nodes, as in docker-compose.yml; 0: none
	// HookPort is the local hook listener's port (HOOK_LOCAL_ADDR on
	// 127.0.0.1, on the first node): unsigned hooks from this machine.
	// 0: none.
	HookPort int
	Base     *config.Config
	Logger   *slog.Logger
	Out      io.Writer // where the connection details are printed
}

// Demo is the seeded demo mesh, saved in the data folder so that
// restarts reuse the same keys.
type Demo struct {
	MeshID         string       `json:"meshId"`
	Slug           string       `json:"slug"`
	OwnerPubkey    string       `json:"ownerPubkey"`
	OwnerSecretKey string       `json:"ownerSecretKey"`
	Members        []DemoMember `json:"members"`
}

// DemoMember is one seeded identity.
type DemoMember struct {
	Name      string `json:"name"`
	MemberID  string `json:"memberId"`
	Pubkey    string `json:"pubkey"`
	SecretKey string `json:"secretKey"`
}

// Cluster is a running dev cluster.
type Cluster struct {
	PG     *pgembed.Server // nil when DATABASE_URL was given
	DBURL  string
	Nodes  []*node.Node
	LB     *LB // nil when Options.LBPort is 0
	Demo   Demo
	logger *slog.Logger
}

// Start brings the cluster up.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	if o.Nodes <= 0 {
		o.Nodes = 3
	}
	if o.DataDir == "" {
		o.DataDir = ".data"
	}
	if o.Base == nil {
		o.Base = &config.Config{}
		o.Base.Normalize()
	}
	if o.BasePort == 0 {
		o.BasePort = o.Base.Port
	}
	if o.GossipPort == 0 {
		o.GossipPort = 7946
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	c := &Cluster{logger: o.Logger}
	ok := false
	defer func() {
		if !ok {
			c.Stop(context.Background())
		}
	}()
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return nil, err
	}
	c.DBURL = o.Base.DatabaseURL
	if c.DBURL == "" {
		fmt.Fprintf(o.Out, "Starting a private PostgreSQL in %s …\n", filepath.Join(o.DataDir, "pg"))
		pgDir := filepath.Join(o.DataDir, "pg")
		pg, err := pgembed.Start(ctx, pgembed.Options{DataDir: pgDir, Port: o.PGPort, Logger: o.Logger})
		if errors.Is(err, pgembed.ErrUnreachableDir) {
			// Running as root in a private home folder: Postgres runs as the
			// postgres user, who cannot enter it. Keep its data in /var/tmp.
			pgDir = fallbackDir(pgDir)
			fmt.Fprintf(o.Out, "  (the postgres user cannot enter %s; using %s instead)\n", o.DataDir, pgDir)
			pg, err = pgembed.Start(ctx, pgembed.Options{DataDir: pgDir, Port: o.PGPort, Logger: o.Logger})
		}
		if err != nil {
			return nil, err
		}
		c.PG = pg
		c.DBURL = pg.URL("postgres")
	}
	if _, err := store.Migrate(ctx, c.DBURL); err != nil {
		return nil, err
	}
	st, err := store.Open(ctx, c.DBURL, 4)
	if err != nil {
		return nil, err
	}
	c.Demo, err = seed(ctx, st, filepath.Join(o.DataDir, "demo.json"))
	st.Close()
	if err != nil {
		return nil, fmt.Errorf("seed demo mesh: %w", err)
	}
	host := o.Base.Host
	if host == "" {
		host = "127.0.0.1" // a dev cluster is not exposed beyond this machine
	}
	first := net.JoinHostPort("127.0.0.1", strconv.Itoa(o.GossipPort))
	// The load balancer reaches the nodes from 127.0.0.1 (or from the
	// nodes' own address): the nodes believe its X-Forwarded-For, so every
	// client behind it has limits of its own.
	trusted := append(slices.Clone(o.Base.TrustedProxies), "127.0.0.1/32")
	if ip, err := netip.ParseAddr(host); err == nil && !ip.IsLoopback() && !ip.IsUnspecified() {
		trusted = append(trusted, ip.String())
	}
	for i := 0; i < o.Nodes; i++ {
		cfg := *o.Base
		cfg.TrustedProxies = trusted
		cfg.HookLocalAddr = ""
		if i == 0 && o.HookPort != 0 {
			cfg.HookLocalAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(o.HookPort))
		}
		cfg.DatabaseURL = c.DBURL
		cfg.Host = host
		cfg.Port = o.BasePort + i
		cfg.NodeName = "dev-" + strconv.Itoa(i+1)
		cfg.ClusterBind = net.JoinHostPort("127.0.0.1", strconv.Itoa(o.GossipPort+i))
		cfg.ClusterAdvertise = ""
		cfg.ClusterProfile = "local"
		cfg.PublicURL = ""
		if i > 0 {
			cfg.ClusterJoin = []string{first}
		}
		cfg.Normalize()
		if err := cfg.Validate(); err != nil {
			return nil, err
		}
		n, err := node.Start(ctx, node.Options{Config: &cfg, Logger: o.Logger, SkipMigrate: true})
		if err != nil {
			return nil, fmt.Errorf("start %s: %w", cfg.NodeName, err)
		}
		c.Nodes = append(c.Nodes, n)
	}
	if o.LBPort != 0 {
		backends := make([]Backend, len(c.Nodes))
		for i, n := range c.Nodes {
			backends[i] = Backend{Name: n.Name(), URL: n.HTTPURL()}
		}
		lb, err := StartLB(LBOptions{Addr: net.JoinHostPort(host, strconv.Itoa(o.LBPort)), Backends: backends, Logger: o.Logger})
		if err != nil {
			return nil, err
		}
		c.LB = lb
	}
	ok = true
	c.print(o.Out, o.Base.AdminToken != "")
	return c, nil
}

// fallbackDir is a per-project data folder under /var/tmp.
func fallbackDir(dir string) string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		abs = dir
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join("/var/tmp", "claudemesh-dev-"+hex.EncodeToString(sum[:6]), "pg")
}

func seed(ctx context.Context, st *store.Store, path string) (Demo, error) {
	var d Demo
	if data, err := os.ReadFile(path); err == nil {
		if json.Unmarshal(data, &d) == nil && d.MeshID != "" {
			if _, err := st.GetMesh(ctx, d.MeshID); err == nil {
				return d, nil
			}
		}
	}
	mc, err := admin.CreateMesh(ctx, st, "demo", "")
	if err != nil {
		return d, err
	}
	d = Demo{MeshID: mc.MeshID, Slug: mc.Slug, OwnerPubkey: mc.OwnerPubkey, OwnerSecretKey: mc.OwnerSecretKey}
	for _, name := range []string{"alice", "bob"} {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return d, err
		}
		m, err := admin.AddMember(ctx, st, mc.MeshID, hex.EncodeToString(pub), name, "member")
		if err != nil {
			return d, err
		}
		d.Members = append(d.Members, DemoMember{Name: name, MemberID: m.ID, Pubkey: m.Pubkey, SecretKey: hex.EncodeToString(priv)})
	}
	data, _ := json.MarshalIndent(d, "", "  ")
	if err := os.WriteFile(path, append(data, '\n'), 0o600); err != nil {
		return d, err
	}
	return d, nil
}

func (c *Cluster) print(w io.Writer, statusPage bool) {
	fmt.Fprintf(w, "\nclaudemesh dev cluster: %d nodes\n", len(c.Nodes))
	if c.LB != nil {
		fmt.Fprintf(w, "  lb     %s   (round-robin over the healthy nodes, like docker-compose's HAProxy)\n", c.LB.URL())
	}
	for _, n := range c.Nodes {
		fmt.Fprintf(w, "  %-6s %s   (health: %s/health, metrics: %s/metrics, gossip %s)\n", n.Name(), n.URL(), n.HTTPURL(), n.HTTPURL(), n.GossipAddr())
	}
	if u := c.Nodes[0].HookURL(); u != "" {
		fmt.Fprintf(w, "  hooks  %s   (unsigned hooks from this machine; the URLs above take signed ones)\n", u)
	}
	if statusPage {
		base := c.Nodes[0].HTTPURL()
		if c.LB != nil {
			base = c.LB.HTTPURL()
		}
		fmt.Fprintf(w, "\nStatus page: %s/status (log in with ADMIN_TOKEN)\n", base)
	}
	fmt.Fprintf(w, "\nPostgres: %s\n", c.DBURL)
	fmt.Fprintf(w, "\nDemo mesh %q\n  meshId: %s\n", c.Demo.Slug, c.Demo.MeshID)
	for _, m := range c.Demo.Members {
		fmt.Fprintf(w, "  %-6s memberId %s\n         pubkey    %s\n         secretKey %s\n", m.Name, m.MemberID, m.Pubkey, m.SecretKey)
	}
	fmt.Fprintf(w, "\nConnect a peer to the lb or to any node: send a signed hello to one of the URLs above\n(canonical \"meshId|memberId|pubkey|timestampMs\", ed25519 with the secret key).\nCtrl-C stops the cluster.\n\n")
}

// Stop shuts the nodes down gracefully (their sockets, load-balanced ones
// included, get a 1001 close), then the load balancer, then Postgres.
func (c *Cluster) Stop(ctx context.Context) error {
	var errs []error
	for _, n := range c.Nodes {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := n.Shutdown(sctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if c.LB != nil {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := c.LB.Close(sctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if c.PG != nil {
		if err := c.PG.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
