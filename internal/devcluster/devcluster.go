// Package devcluster is `broker dev`: a private Postgres from the machine's
// server binaries, migrations, a demo mesh with a ready invite, and N broker
// nodes gossiping on loopback behind a load balancer — in this process, or
// each node as its own child process (Options.Processes).
//
// What it prints keeps working across restarts of the same data folder:
// the Postgres port, the demo mesh and its invite are kept there.
package devcluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/fsutil"
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
	// PGPort is the private Postgres's port. Zero means the port this data
	// folder used last time (saved in it), else one derived from the
	// folder's path; when another program holds it, a free one (which is
	// then saved).
	PGPort int
	LBPort int // load balancer in front of the nodes, as in docker-compose.yml; 0: none
	// PublicURL is written into the demo invite; empty means the load
	// balancer's URL (node 1's without one).
	PublicURL string
	// Processes runs each node as its own process: Executable (default:
	// this program) re-executed as `broker serve`.
	Processes  bool
	Executable string
	// ChildOutput receives the node processes' output; default stderr.
	ChildOutput io.Writer
	// ShowKeys prints the demo mesh's keys and enrols two members with
	// keys, for clients that speak the protocol themselves.
	ShowKeys bool
	// Command is how the banner spells the broker command in the lines it
	// suggests; default "broker".
	Command string
	// HookPort is the local hook listener's port (HOOK_LOCAL_ADDR on
	// 127.0.0.1, on the first node): unsigned hooks from this machine.
	// 0: none.
	HookPort int
	Base     *config.Config
	Logger   *slog.Logger
	Out      io.Writer // where the banner and later notices are printed
}

// Cluster is a running dev cluster.
type Cluster struct {
	PG        *pgembed.Server // nil when DATABASE_URL was given
	DBURL     string
	PublicURL string       // what the demo invite carries
	Nodes     []*node.Node // in-process nodes
	Procs     []*Proc      // node processes (Options.Processes)
	LB        *LB          // nil when Options.LBPort is 0
	Demo      Demo

	opts     Options
	logger   *slog.Logger
	lock     *dataLock
	spawn    *spawner
	procWG   sync.WaitGroup
	stopping atomic.Bool
	outMu    sync.Mutex
	stopOnce sync.Once
	stopErr  error
	seeded   seeding
	pgNote   string // how the Postgres port was chosen, for the banner
}

// Start brings the cluster up and prints the banner.
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
	if o.ChildOutput == nil {
		o.ChildOutput = os.Stderr
	}
	if o.Command == "" {
		o.Command = "broker"
	}
	c := &Cluster{opts: o, logger: o.Logger}
	ok := false
	defer func() {
		if !ok {
			c.Stop(context.Background())
		}
	}()
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return nil, err
	}
	lock, err := lockData(o.DataDir)
	if err != nil {
		return nil, err
	}
	c.lock = lock

	host := o.Base.Host
	if host == "" {
		host = "127.0.0.1" // a dev cluster is not exposed beyond this machine
	}
	c.PublicURL = o.PublicURL
	if c.PublicURL == "" {
		port := o.BasePort
		if o.LBPort != 0 {
			port = o.LBPort
		}
		c.PublicURL = config.NodeURL(host, port)
	}
	if err := config.CheckPublicURL(c.PublicURL); err != nil {
		return nil, fmt.Errorf("PUBLIC_URL: %w", err)
	}

	c.DBURL = o.Base.DatabaseURL
	if c.DBURL == "" {
		if err := c.startPostgres(ctx); err != nil {
			return nil, err
		}
	}
	if _, err := store.Migrate(ctx, c.DBURL); err != nil {
		return nil, err
	}
	st, err := store.Open(ctx, c.DBURL, 4)
	if err != nil {
		return nil, err
	}
	c.Demo, c.seeded, err = seed(ctx, st, filepath.Join(o.DataDir, "demo.json"), c.PublicURL, o.ShowKeys)
	st.Close()
	if err != nil {
		return nil, fmt.Errorf("seed demo mesh: %w", err)
	}

	if o.Processes {
		err = c.startProcs(ctx, host)
	} else {
		err = c.startNodes(ctx, host)
	}
	if err != nil {
		return nil, err
	}
	if o.LBPort != 0 {
		var backends []Backend
		for _, n := range c.Nodes {
			backends = append(backends, Backend{Name: n.Name(), URL: n.HTTPURL()})
		}
		for _, p := range c.Procs {
			backends = append(backends, Backend{Name: p.Name, URL: p.HTTPURL})
		}
		lb, err := StartLB(LBOptions{Addr: net.JoinHostPort(host, strconv.Itoa(o.LBPort)), Backends: backends, Logger: o.Logger})
		if err != nil {
			return nil, err
		}
		c.LB = lb
	}
	ok = true
	c.outMu.Lock()
	c.printBanner(o.Out)
	c.outMu.Unlock()
	return c, nil
}

// nodeConfig is node i's part of the configuration.
type nodeConfig struct {
	name, bind, join string
	port             int
	hook             string // HOOK_LOCAL_ADDR: the first node's, or none
}

func (c *Cluster) nodeConfig(i int) nodeConfig {
	nc := nodeConfig{
		name: "dev-" + strconv.Itoa(i+1),
		port: c.opts.BasePort + i,
		bind: net.JoinHostPort("127.0.0.1", strconv.Itoa(c.opts.GossipPort+i)),
	}
	if i > 0 {
		nc.join = net.JoinHostPort("127.0.0.1", strconv.Itoa(c.opts.GossipPort))
	}
	if i == 0 && c.opts.HookPort != 0 {
		nc.hook = net.JoinHostPort("127.0.0.1", strconv.Itoa(c.opts.HookPort))
	}
	return nc
}

// trustedProxies are the nodes' TRUSTED_PROXIES: the load balancer reaches
// them from 127.0.0.1 (or from the nodes' own address), and they believe its
// X-Forwarded-For, so every client behind it has limits of its own.
func (c *Cluster) trustedProxies(host string) []string {
	trusted := append(slices.Clone(c.opts.Base.TrustedProxies), "127.0.0.1/32")
	if ip, err := netip.ParseAddr(host); err == nil && !ip.IsLoopback() && !ip.IsUnspecified() {
		trusted = append(trusted, ip.String())
	}
	return trusted
}

// hookURL is where unsigned hooks from this machine go, or "".
func (c *Cluster) hookURL() string {
	if hook := c.nodeConfig(0).hook; hook != "" {
		return "http://" + hook + "/hook/set-status"
	}
	return ""
}

func (c *Cluster) startNodes(ctx context.Context, host string) error {
	for i := 0; i < c.opts.Nodes; i++ {
		nc := c.nodeConfig(i)
		cfg := *c.opts.Base
		cfg.DatabaseURL = c.DBURL
		cfg.Host = host
		cfg.Port = nc.port
		cfg.NodeName = nc.name
		cfg.ClusterBind = nc.bind
		cfg.ClusterAdvertise = ""
		cfg.ClusterJoin = nil
		if nc.join != "" {
			cfg.ClusterJoin = []string{nc.join}
		}
		cfg.ClusterProfile = "local"
		cfg.PublicURL = c.PublicURL
		cfg.MetricsAddr = "" // each node serves /metrics on its own port
		cfg.TrustedProxies = c.trustedProxies(host)
		cfg.HookLocalAddr = nc.hook
		cfg.Normalize()
		if err := cfg.Validate(); err != nil {
			return err
		}
		n, err := node.Start(ctx, node.Options{Config: &cfg, Logger: c.logger, SkipMigrate: true})
		if err != nil {
			return fmt.Errorf("start %s: %w", cfg.NodeName, err)
		}
		c.Nodes = append(c.Nodes, n)
	}
	return nil
}

func (c *Cluster) startProcs(ctx context.Context, host string) error {
	exe := c.opts.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("--processes re-executes this program: %w", err)
		}
	}
	c.spawn = newSpawner()
	urlHost := host
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		urlHost = "127.0.0.1"
	}
	for i := 0; i < c.opts.Nodes; i++ {
		nc := c.nodeConfig(i)
		env := map[string]string{
			"DATABASE_URL": c.DBURL, "BROKER_HOST": host, "BROKER_PORT": strconv.Itoa(nc.port),
			"NODE_NAME": nc.name, "CLUSTER_BIND": nc.bind, "CLUSTER_ADVERTISE": "", "CLUSTER_JOIN": nc.join,
			"CLUSTER_PROFILE": "local", "PUBLIC_URL": c.PublicURL, "METRICS_ADDR": "",
			"TRUSTED_PROXIES": strings.Join(c.trustedProxies(host), ","), "HOOK_LOCAL_ADDR": nc.hook,
		}
		addr := net.JoinHostPort(urlHost, strconv.Itoa(nc.port))
		if _, err := c.startProc(ctx, exe, nc.name, "http://"+addr, "ws://"+addr+"/ws", env, c.opts.ChildOutput); err != nil {
			return err
		}
	}
	return nil
}

// startPostgres starts the private server on the data folder's port.
func (c *Cluster) startPostgres(ctx context.Context) error {
	o := c.opts
	pgDir := filepath.Join(o.DataDir, "pg")
	fmt.Fprintf(o.Out, "Starting a private PostgreSQL in %s …\n", pgDir)
	port, fallback := o.PGPort, false
	portFile := filepath.Join(o.DataDir, "postgres-port")
	if port == 0 {
		port, fallback = stablePGPort(o.DataDir, portFile), true
	}
	opts := pgembed.Options{DataDir: pgDir, Port: port, PortFallback: fallback, Logger: o.Logger,
		Notify: func(msg string) { c.notify(msg) }}
	pg, err := pgembed.Start(ctx, opts)
	if errors.Is(err, pgembed.ErrUnreachableDir) {
		// Running as root in a private home folder: Postgres runs as the
		// postgres user, who cannot enter it. Keep its data in /var/tmp.
		opts.DataDir = fallbackDir(pgDir)
		fmt.Fprintf(o.Out, "  (the postgres user cannot enter %s; using %s instead)\n", o.DataDir, opts.DataDir)
		pg, err = pgembed.Start(ctx, opts)
	}
	if err != nil {
		return err
	}
	c.PG = pg
	c.DBURL = pg.URL("postgres")
	switch {
	case o.PGPort != 0:
		c.pgNote = "--pg-port"
	case pg.Port() == port:
		c.pgNote = "the same port every time for this --data"
	default:
		c.pgNote = "kept for this --data from now on"
	}
	if o.PGPort == 0 && pg.Port() != port {
		if err := fsutil.WriteFileAtomic(portFile, []byte(strconv.Itoa(pg.Port())+"\n"), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// stablePGPort is the port saved in portFile, else one derived from the
// data folder's absolute path, so that two folders (two checkouts) get
// different ports. The range stays below Linux's ephemeral ports (32768
// and up), which the kernel hands out for outgoing connections.
func stablePGPort(dataDir, portFile string) int {
	if b, err := os.ReadFile(portFile); err == nil {
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p > 0 && p < 65536 {
			return p
		}
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		abs = dataDir
	}
	h := fnv.New32a()
	h.Write([]byte(abs))
	return 20000 + int(h.Sum32()%10000)
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

// notify prints a notice while the cluster runs (a node process exited) or
// starts (a Postgres left by an earlier run).
func (c *Cluster) notify(msg string) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	fmt.Fprintln(c.opts.Out, "  "+msg)
}

// JoinLine is the command the banner prints for name.
func (c *Cluster) JoinLine(name string) string {
	return "claudemesh join " + c.Demo.Invite.Token + " --name " + name
}

func (c *Cluster) printBanner(w io.Writer) {
	o := c.opts
	n := len(c.Nodes) + len(c.Procs)
	how := ""
	if o.Processes {
		how = ", each its own process"
	}
	if c.LB != nil {
		fmt.Fprintf(w, "\nclaudemesh dev cluster: %d nodes%s, behind a load balancer\n", n, how)
		fmt.Fprintf(w, "  lb     %s   (round-robin over the healthy nodes, like docker-compose's HAProxy)\n", c.LB.URL())
	} else {
		fmt.Fprintf(w, "\nclaudemesh dev cluster: %d nodes%s\n", n, how)
	}
	for _, nd := range c.Nodes {
		fmt.Fprintf(w, "  %-6s %s   (health: %s/health, metrics: %s/metrics, gossip %s)\n", nd.Name(), nd.URL(), nd.HTTPURL(), nd.HTTPURL(), nd.GossipAddr())
	}
	for i, p := range c.Procs {
		fmt.Fprintf(w, "  %-6s %s   PID %-7d (health: %s/health, gossip %s)\n", p.Name, p.URL, p.PID, p.HTTPURL, c.nodeConfig(i).bind)
	}
	if u := c.hookURL(); u != "" {
		fmt.Fprintf(w, "  hooks  %s   (unsigned hooks from this machine; the URLs above take signed ones)\n", u)
	}
	if len(c.Procs) > 0 {
		last := c.Procs[len(c.Procs)-1]
		fmt.Fprintf(w, "  `kill %d` stops %s: its peers reconnect through the load balancer to the others.\n", last.PID, last.Name)
	}

	if c.PG != nil {
		fmt.Fprintf(w, "\nPostgres: %s   (port %d: %s)\n", c.DBURL, c.PG.Port(), c.pgNote)
	} else {
		fmt.Fprintf(w, "\nPostgres: %s   (DATABASE_URL)\n", redact(c.DBURL))
	}

	switch {
	case c.seeded.replacedOld:
		fmt.Fprintf(w, "\n(the demo mesh of an older broker dev, whose members had keys the claudemesh CLI cannot use, was replaced)\n")
	case !c.seeded.newMesh && c.seeded.newInvite != "":
		fmt.Fprintf(w, "\n(a new demo invite: %s; earlier join lines no longer apply)\n", c.seeded.newInvite)
	}
	fmt.Fprintf(w, "\nDemo mesh %q — join it, one line per person, each with their own HOME (or machine):\n", c.Demo.Slug)
	for _, name := range DemoNames {
		fmt.Fprintf(w, "  %s\n", c.JoinLine(name))
	}
	fmt.Fprintf(w, "then `claudemesh install` connects Claude Code. The invite points at %s and stays the same\n", c.PublicURL)
	fmt.Fprintf(w, "across restarts of this --data (valid until %s, %d uses). No claudemesh yet? `go install ./cmd/claudemesh`\n",
		c.Demo.Invite.ExpiresAt.UTC().Format("2006-01-02"), c.Demo.Invite.MaxUses)

	dbURL := c.DBURL
	if c.PG == nil {
		dbURL = "<your DATABASE_URL>"
	}
	fmt.Fprintf(w, "\nMore invites, members and the audit log:\n")
	fmt.Fprintf(w, "  export DATABASE_URL='%s' PUBLIC_URL=%s\n", dbURL, c.PublicURL)
	fmt.Fprintf(w, "  %s admin invite create --mesh %s --max-uses 5\n", o.Command, c.Demo.Slug)
	fmt.Fprintf(w, "  %s admin audit --mesh %s\n", o.Command, c.Demo.Slug)
	if o.Base.AdminToken != "" {
		base := "http://" + strings.TrimPrefix(strings.TrimSuffix(c.PublicURL, "/ws"), "ws://")
		fmt.Fprintf(w, "Status page: %s/status (log in with ADMIN_TOKEN)\n", base)
	}

	if o.ShowKeys {
		fmt.Fprintf(w, "\nKeys (--keys), for clients that speak the protocol themselves:\n")
		fmt.Fprintf(w, "  meshId    %s\n  owner     pubkey    %s\n            secretKey %s\n", c.Demo.MeshID, c.Demo.OwnerPubkey, c.Demo.OwnerSecretKey)
		for _, m := range c.Demo.Keyed {
			fmt.Fprintf(w, "  %-9s memberId  %s\n            pubkey    %s\n            secretKey %s\n", m.Name, m.MemberID, m.Pubkey, m.SecretKey)
		}
		fmt.Fprintf(w, "  Connect to any URL above with a hello signed with the secret key (ed25519 over\n  \"meshId|memberId|pubkey|timestampMs\"); see PROTOCOL.md.\n")
	}
	if len(c.Procs) > 0 {
		fmt.Fprintf(w, "\nCtrl-C stops the cluster, its node processes and Postgres.\n\n")
	} else {
		fmt.Fprintf(w, "\nCtrl-C stops the cluster and Postgres.\n\n")
	}
}

// redact hides a password in a connection string the user supplied.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

// Stop shuts the nodes down gracefully (their sockets, load-balanced ones
// included, get a 1001 close), then the load balancer, then Postgres, and
// releases the data folder. It is idempotent.
func (c *Cluster) Stop(ctx context.Context) error {
	c.stopOnce.Do(func() { c.stopErr = c.stop(ctx) })
	return c.stopErr
}

func (c *Cluster) stop(ctx context.Context) error {
	c.stopping.Store(true)
	var errs []error
	for _, n := range c.Nodes {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := n.Shutdown(sctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if len(c.Procs) > 0 {
		if err := c.stopProcs(c.opts.Base.ShutdownTimeout + 5*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if c.spawn != nil {
		c.spawn.close()
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
	c.lock.release()
	return errors.Join(errs...)
}
