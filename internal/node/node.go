// Package node assembles one broker node from its parts (store, relay,
// presence, server) and runs it. `broker serve`, `broker dev` and the tests
// all start nodes through Start.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/jackc/pgx/v5"
	"github.com/pires/go-proxyproto"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/claudemesh/broker/internal/audit"
	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/dbclock"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/httpapi"
	"github.com/claudemesh/broker/internal/maintenance"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/server"
	"github.com/claudemesh/broker/internal/store"
)

// Options configure a node beyond its Config.
type Options struct {
	Config *config.Config
	Logger *slog.Logger
	// Registry receives the node's metrics; a new one when nil.
	Registry *prometheus.Registry
	// Listener, when set, is used instead of listening on Config.Addr().
	Listener net.Listener
	// SkipMigrate skips applying migrations at start-up.
	SkipMigrate bool
	// WrapTransport wraps the gossip transport (tests cut the network).
	WrapTransport func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport
	// Clock is the node's wall clock; nil means time.Now. Tests skew it to
	// check that the node corrects for its offset from Postgres' clock.
	Clock func() time.Time
	// DBTracer, when set, traces the store's connections (tests watch
	// which connections are opened and statements prepared).
	DBTracer pgx.QueryTracer
	// TestSignals turns the delivery engine's test signals on before the
	// node starts, so a test can wait for events of the start-up (the
	// relay's first LISTEN) too.
	TestSignals bool
}

// Node is a running broker node.
type Node struct {
	cfg      *config.Config
	logger   *slog.Logger
	store    *store.Store
	replica  *presence.Replica
	cluster  *presence.Cluster
	notifier *relay.Notifier
	listener *relay.Listener
	clock    *dbclock.Clock
	audit    *audit.Writer
	engine   *delivery.Engine
	srv      *server.Server
	upkeep   *maintenance.Worker // queue depth, purges, GC of idle limiters and member lists
	api      *httpapi.API
	http     *http.Server
	metrics  *http.Server // only with METRICS_ADDR
	hooks    *http.Server // only with HOOK_LOCAL_ADDR

	metricsAddr string
	hookAddr    string
	ln          net.Listener

	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
	err    error
}

// Start brings a node up: migrations, gossip, relay listener, HTTP. It
// returns once the node serves.
func Start(ctx context.Context, o Options) (*Node, error) {
	cfg := o.Config
	if err := cfg.RequireDatabase(); err != nil {
		return nil, err
	}
	if err := cfg.RequireGossipSecret(); err != nil {
		return nil, err
	}
	logger := o.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("node", cfg.NodeName)
	if cfg.ClusterSecret == "" && cfg.ClusterInsecure {
		logger.Warn("gossip is not authenticated (CLUSTER_INSECURE=true): any host that reaches the gossip port can join the cluster",
			"cluster_bind", cfg.ClusterBind)
	}
	reg := o.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	if !o.SkipMigrate {
		if err := migrateWithRetry(ctx, cfg.DatabaseURL, logger); err != nil {
			return nil, err
		}
	}
	st, err := store.Open(ctx, cfg.DatabaseURL, cfg.DBPoolSize, store.WithTracer(o.DBTracer))
	if err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, logger: logger, store: st}
	ok := false
	defer func() {
		if !ok {
			n.abort()
		}
	}()

	m := metrics.New(reg)
	inc := time.Now().UnixNano()
	n.replica = presence.NewReplica(cfg.NodeName, inc, cfg.Grace())
	n.replica.SetLimits(cfg.MaxSessionsPerMember, func(reason string) { m.GossipEntriesDropped.WithLabelValues(reason).Inc() })
	envKey, err := envelopeKey(ctx, cfg, st, logger)
	if err != nil {
		return nil, err
	}
	ip, op := envKey.Pads()
	st.SetEnvelopeKey(ip, op)
	// Open and prepare the pools' connections before serving: a node far
	// from Postgres would pay several round trips for each on its first
	// requests. Postgres down is not fatal here (the health check reports
	// it, and warms the pools when it is back).
	wctx, wcancel := context.WithTimeout(ctx, warmTimeout)
	if err := st.Warm(wctx); err != nil {
		logger.Warn("database pool not warm at start-up; requests will open connections", "err", err)
	}
	wcancel()

	ln := o.Listener
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.Addr()); err != nil {
			return nil, fmt.Errorf("listen on %s: %w", cfg.Addr(), err)
		}
	}
	n.ln = ln
	if cfg.ProxyProtocol {
		if ln, err = proxyListener(ln, cfg.TrustedProxies); err != nil {
			return nil, err
		}
	}

	bindHost, bindPort, err := splitHostPort(cfg.ClusterBind)
	if err != nil {
		return nil, fmt.Errorf("CLUSTER_BIND: %w", err)
	}
	gopts := presence.Options{
		Name: cfg.NodeName, Incarnation: inc, BindAddr: bindHost, BindPort: bindPort,
		Profile: cfg.ClusterProfile, Secret: cfg.ClusterSecret, HTTPAddr: ln.Addr().String(),
		Logger: logger.With("component", "gossip"), WrapTransport: o.WrapTransport,
		OnInvalid:        m.GossipDropped.Inc,
		OnDropped:        func(reason string) { m.GossipEntriesDropped.WithLabelValues(reason).Inc() },
		OnCommandDropped: m.GossipCommandsDropped.Inc,
		OnRefused:        m.GossipRefused.Inc,
		OnState: func(size int, warn bool) {
			m.GossipStateBytes.Set(float64(size))
			if warn {
				m.GossipStateWarnings.Inc()
			}
		},
	}
	if cfg.ClusterAdvertise != "" {
		if gopts.AdvertiseAddr, gopts.AdvertisePort, err = splitHostPort(cfg.ClusterAdvertise); err != nil {
			return nil, fmt.Errorf("CLUSTER_ADVERTISE: %w", err)
		}
	}
	n.cluster = presence.New(gopts, n.replica)
	n.notifier = relay.NewNotifier(st.Notify, logger, func(k int) { m.RelaySent.Add(float64(k)) })
	if err := n.notifier.Start(ctx); err != nil {
		return nil, err
	}

	n.clock = dbclock.New(st, o.Clock, m, logger.With("component", "dbclock"))
	n.audit = audit.New(st, m, logger)
	if err := n.audit.Start(ctx); err != nil {
		return nil, err
	}
	n.engine = delivery.New(delivery.Config{
		Node: cfg.NodeName, Incarnation: inc, LeaseDuration: cfg.LeaseDuration, MessageTTL: cfg.MessageTTL,
		SweepInterval: cfg.SweepInterval, DisableRemoteFastPath: cfg.DisableRemoteFastPath,
		Now: n.clock.Now, // the cluster's clock, measured against Postgres
	}, delivery.Deps{Queue: st, Directory: n.replica, Notifier: n.notifier, Auditor: n.audit, Metrics: m, Logger: logger,
		Liveness: n.cluster})
	// Sessions here take over the leases of nodes that stop answering.
	n.cluster.SetReachHandler(n.engine.NodeReach)
	if o.TestSignals {
		ts := &n.engine.TestSignals
		ts.ClaimRound.Init()
		ts.Committed.Init()
		ts.Listening.Init()
		ts.Marked.Init()
		ts.Expired.Init()
	}
	n.srv = server.New(server.Deps{
		Config: cfg, Store: st, Replica: n.replica, Cluster: n.cluster, Engine: n.engine, Audit: n.audit,
		Metrics: m, Logger: logger, Clock: n.clock,
	})
	n.upkeep = maintenance.New(maintenance.Config{DeliveredRetention: cfg.DeliveredRetention, AuditRetention: cfg.AuditRetention},
		maintenance.Deps{Store: st, Depth: func(k int64) { m.QueueDepth.Set(float64(k)) }, Logger: logger,
			GC: []func(){func() { n.srv.HelloRate().GC(5 * time.Minute) }, n.srv.Members().GC}})
	n.api = httpapi.New(httpapi.Deps{
		Config: cfg, Node: n.srv, Replica: n.replica, Cluster: n.cluster, Store: st, Members: n.srv.Members(),
		Audit: n.audit, HelloRate: n.srv.HelloRate(), Addrs: n.srv.Addrs(), Metrics: m, Gatherer: reg, Logger: logger,
	})
	if err := n.api.Start(ctx); err != nil {
		return nil, err
	}
	// Work that failed while Postgres was away may be waiting.
	n.clock.OnHealthy = func() { n.engine.WakeAll(delivery.ReasonSweep) }
	n.clock.Warm = st.Warm
	if err := n.clock.Start(ctx); err != nil {
		return nil, err
	}
	if err := n.engine.Start(ctx); err != nil {
		return nil, err
	}
	n.replica.SetObservers(n.srv.PresenceChanged, n.cluster.Replicate)
	n.cluster.SetHandlers(n.srv.HandleCommand, n.srv.NodeEvent)
	if err := n.cluster.Start(); err != nil {
		return nil, err
	}
	if err := n.srv.Start(ctx); err != nil {
		return nil, err
	}
	if err := n.upkeep.Start(ctx); err != nil {
		return nil, err
	}

	runCtx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	listener := relay.NewListener(func(ctx context.Context) (*pgx.Conn, error) {
		cc, err := pgx.ParseConfig(cfg.DatabaseURL)
		if err != nil {
			return nil, err
		}
		cc.RuntimeParams["application_name"] = RelayApplicationName(cfg.NodeName)
		cc.ConnectTimeout = 5 * time.Second
		return pgx.ConnectConfig(ctx, cc)
	}, store.MemberChannel, relay.NodeChannel(n.replica.Self()), envKey, relay.Handlers{
		Wake: n.engine.RelayWake, Envelope: n.engine.RelayEnvelope, MemberChange: n.srv.MemberChanged, Listening: n.srv.RelayListening,
		Rejected: func(reason string) { m.RelayRejected.WithLabelValues(reason).Inc() },
	}, logger.With("component", "relay"))
	n.listener = listener
	if err := listener.Start(ctx); err != nil {
		return nil, err
	}

	n.http = httpServer(n.api.Handler(http.HandlerFunc(n.srv.ServeWS)), logger)
	n.goRun(func() {
		if err := n.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("http server stopped", "err", err)
		}
	})
	if cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return nil, fmt.Errorf("METRICS_ADDR %s: %w", cfg.MetricsAddr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", n.api.MetricsHandler())
		if cfg.PProf {
			// Go's profiler exposes memory contents and can stall the
			// node: only on the private listener, only when asked for,
			// behind METRICS_TOKEN when there is one.
			mux.Handle("/debug/pprof/", n.api.RequireMetricsToken(http.HandlerFunc(pprof.Index)))
			mux.Handle("/debug/pprof/cmdline", n.api.RequireMetricsToken(http.HandlerFunc(pprof.Cmdline)))
			mux.Handle("/debug/pprof/profile", n.api.RequireMetricsToken(http.HandlerFunc(pprof.Profile)))
			mux.Handle("/debug/pprof/symbol", n.api.RequireMetricsToken(http.HandlerFunc(pprof.Symbol)))
			mux.Handle("/debug/pprof/trace", n.api.RequireMetricsToken(http.HandlerFunc(pprof.Trace)))
		}
		n.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: maxHeaderBytes}
		n.metricsAddr = mln.Addr().String()
		n.goRun(func() { _ = n.metrics.Serve(mln) })
	}
	if cfg.MetricsAddr == "" && cfg.MetricsToken == "" {
		// Anyone who reaches the WebSocket port reads every counter
		// (meshes, sessions, rates): say so once, and how to close it.
		logger.Warn("/metrics is public: it is served on the WebSocket port without a token; set METRICS_ADDR to serve it on a private address, or METRICS_TOKEN to require a bearer token",
			"addr", ln.Addr().String())
	}
	if cfg.HookLocalAddr != "" {
		hln, err := net.Listen("tcp", cfg.HookLocalAddr)
		if err != nil {
			return nil, fmt.Errorf("HOOK_LOCAL_ADDR %s: %w", cfg.HookLocalAddr, err)
		}
		if ip := clientaddr.Peer(hln.Addr().String()); !ip.IsLoopback() {
			_ = hln.Close()
			return nil, fmt.Errorf("HOOK_LOCAL_ADDR %s listens on %s, which is not loopback", cfg.HookLocalAddr, hln.Addr())
		}
		n.hooks = httpServer(n.api.LocalHookHandler(), logger)
		n.hookAddr = hln.Addr().String()
		n.goRun(func() { _ = n.hooks.Serve(hln) })
	}
	n.goRun(func() { n.discovery(runCtx) })
	ok = true
	logger.Info("broker listening", "addr", ln.Addr().String(), "ws_path", "/ws", "gossip", n.cluster.LocalAddr(),
		"version", httpapi.Version, "git_sha", cfg.GitSHA, "ttl_seconds", cfg.StatusTTLSeconds,
		"hook_fresh_seconds", cfg.HookFreshSeconds, "max_connections_per_mesh", cfg.MaxConnsPerMesh,
		"max_message_bytes", cfg.MaxMessageBytes, "hook_rate_limit_per_min", cfg.HookRateLimitPerMin,
		"cluster_profile", cfg.ClusterProfile, "trusted_proxies", cfg.TrustedProxies, "client_ip_header", cfg.ClientIPHeader,
		"proxy_protocol", cfg.ProxyProtocol, "hook_local_addr", n.hookAddr, "join_require_proof", cfg.RequireJoinProof())
	return n, nil
}

// warmTimeout bounds how long a starting node waits for its pools.
const warmTimeout = 30 * time.Second

// maxHeaderBytes bounds a request's headers (Go's default is 1 MiB); the
// broker's requests carry a few short ones.
const maxHeaderBytes = 64 << 10

// httpServer serves h with bounded headers and idle keep-alives. Bodies and
// answers get their deadlines per request (server.Handler): one
// server-wide ReadTimeout would also cut WebSockets.
func httpServer(h http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		MaxHeaderBytes: maxHeaderBytes, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug)}
}

// proxyListener reads a PROXY protocol (v1 or v2) header on connections
// from the trusted proxies, which must send one (their connection's
// address then is the header's source), and refuses connections from
// anyone else that send one; those are served as they are.
func proxyListener(ln net.Listener, trusted []string) (net.Listener, error) {
	prefixes, err := clientaddr.ParseTrusted(trusted)
	if err != nil {
		return nil, fmt.Errorf("TRUSTED_PROXIES: %w", err)
	}
	return &proxyproto.Listener{
		Listener:          ln,
		ReadHeaderTimeout: 10 * time.Second,
		ConnPolicy: func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			if ip := clientaddr.Peer(o.Upstream.String()); ip.IsValid() && containsAddr(prefixes, ip) {
				return proxyproto.REQUIRE, nil
			}
			return proxyproto.REJECT, nil
		},
	}, nil
}

func containsAddr(prefixes []netip.Prefix, ip netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// RelayApplicationName is the application_name of a node's LISTEN
// connection, so operators (and tests) can find it in pg_stat_activity.
func RelayApplicationName(node string) string { return "claudemesh-relay-" + node }

func splitHostPort(hp string) (string, int, error) {
	host, portText, err := net.SplitHostPort(hp)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", hp)
	}
	return host, port, nil
}

// envelopeKey is the key sealing envelope notifications: derived from
// CLUSTER_SECRET when set (nothing in the database reveals it), else the
// random key the nodes share in the relay_key table.
func envelopeKey(ctx context.Context, cfg *config.Config, st *store.Store, logger *slog.Logger) (*relay.EnvelopeKey, error) {
	if cfg.ClusterSecret != "" {
		return relay.NewEnvelopeKey(relay.DeriveEnvelopeKey(cfg.ClusterSecret))
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		key, err := st.RelayKey(cctx)
		cancel()
		if err == nil {
			return relay.NewEnvelopeKey(key)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("read the relay key (is Postgres reachable at DATABASE_URL?): %w", err)
		}
		logger.Warn("reading the relay key failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func migrateWithRetry(ctx context.Context, url string, logger *slog.Logger) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		applied, err := store.Migrate(ctx, url)
		if err == nil {
			if len(applied) > 0 {
				logger.Info("migrations applied", "versions", applied)
			}
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("migrate (is Postgres reachable at DATABASE_URL?): %w", err)
		}
		logger.Warn("migration failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

func (n *Node) goRun(fn func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		fn()
	}()
}

// discovery joins the cluster (CLUSTER_JOIN, else nodes registered in
// Postgres), keeps this node registered, and retries while alone.
func (n *Node) discovery(ctx context.Context) {
	register := func() {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_ = n.store.UpsertNode(cctx, store.Node{Name: n.cfg.NodeName, GossipAddr: n.cluster.LocalAddr(), HTTPAddr: n.ln.Addr().String()})
	}
	join := func() {
		seeds := n.cfg.ClusterJoin
		if len(seeds) == 0 {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			nodes, err := n.store.RecentNodes(cctx, time.Minute)
			cancel()
			if err != nil {
				return
			}
			for _, x := range nodes {
				if x.Name != n.cfg.NodeName {
					seeds = append(seeds, x.GossipAddr)
				}
			}
		}
		if len(seeds) == 0 {
			return
		}
		if k, err := n.cluster.Join(seeds); err != nil && k == 0 {
			n.logger.Debug("cluster join failed; will retry", "seeds", seeds, "err", err)
		} else if k > 0 {
			n.logger.Info("joined cluster", "contacted", k, "size", n.cluster.NumMembers())
		}
	}
	register()
	join()
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for i := 1; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if i%2 == 0 {
			register()
		}
		if n.cluster.NumMembers() <= 1 {
			join()
		}
	}
}

// Addr is the HTTP address the node listens on.
func (n *Node) Addr() string { return n.ln.Addr().String() }

// URL is the node's WebSocket URL.
func (n *Node) URL() string { return "ws://" + n.Addr() + "/ws" }

// HTTPURL is the node's base HTTP URL.
func (n *Node) HTTPURL() string { return "http://" + n.Addr() }

// MetricsURL is where /metrics is served.
func (n *Node) MetricsURL() string {
	if n.metricsAddr != "" {
		return "http://" + n.metricsAddr + "/metrics"
	}
	return n.HTTPURL() + "/metrics"
}

// HookURL is the local hook listener's POST /hook/set-status URL, or ""
// without HOOK_LOCAL_ADDR.
func (n *Node) HookURL() string {
	if n.hookAddr == "" {
		return ""
	}
	return "http://" + n.hookAddr + "/hook/set-status"
}

// GossipAddr is the node's gossip address.
func (n *Node) GossipAddr() string { return n.cluster.LocalAddr() }

// Name is the node's name.
func (n *Node) Name() string { return n.cfg.NodeName }

// Cluster exposes the gossip layer (tests inspect membership).
func (n *Node) Cluster() *presence.Cluster { return n.cluster }

// Replica exposes the presence replica.
func (n *Node) Replica() *presence.Replica { return n.replica }

// Engine exposes the delivery engine (tests wait on its TestSignals).
func (n *Node) Engine() *delivery.Engine { return n.engine }

// Server exposes the WebSocket front (tests wait on its TestSignals).
func (n *Node) Server() *server.Server { return n.srv }

// Store exposes the node's store.
func (n *Node) Store() *store.Store { return n.store }

// Shutdown stops the node in order: stop accepting, close sessions with
// 1001 after flushing their queues, flush acks and notifications, leave the
// cluster, stop the relay listener, close the pool. It is idempotent.
func (n *Node) Shutdown(ctx context.Context) error {
	n.once.Do(func() {
		_ = n.http.Shutdown(ctx) // stops accepting; WebSockets are hijacked and drained below
		if n.metrics != nil {
			_ = n.metrics.Shutdown(ctx)
		}
		if n.hooks != nil {
			_ = n.hooks.Shutdown(ctx)
		}
		if err := n.srv.Shutdown(ctx); err != nil {
			n.err = err
		}
		n.upkeep.Stop(ctx)
		n.engine.Stop(ctx)
		n.api.Stop(ctx)
		n.clock.Stop(ctx)
		n.audit.Stop(ctx)
		n.notifier.Stop(ctx)
		n.cluster.Flush(time.Second)
		_ = n.cluster.Leave(time.Second)
		_ = n.cluster.Shutdown()
		n.listener.Stop(ctx)
		n.cancel()
		n.wg.Wait()
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = n.store.DeleteNode(cctx, n.cfg.NodeName)
		cancel()
		n.store.Close()
	})
	return n.err
}

// Kill stops the node abruptly, without draining or leaving the cluster,
// as a crash would (sockets are cut, nothing is flushed).
func (n *Node) Kill() {
	n.once.Do(func() {
		_ = n.ln.Close()
		_ = n.http.Close()
		if n.metrics != nil {
			_ = n.metrics.Close()
		}
		if n.hooks != nil {
			_ = n.hooks.Close()
		}
		_ = n.cluster.Shutdown()
		n.srv.Abort()
		n.upkeep.Stop(context.Background())
		n.engine.Abort()
		n.api.Stop(context.Background())
		n.clock.Stop(context.Background())
		n.audit.Abort()
		n.notifier.Stop(context.Background())
		n.listener.Stop(context.Background())
		n.cancel()
		n.wg.Wait()
		n.store.Close()
	})
}

// abort releases what a failed Start acquired, in the order Shutdown
// stops it: whatever had started (the server's loops, the engine, the
// listeners) stops before the pool closes under it. Stopping a part that
// never started does nothing.
func (n *Node) abort() {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for _, srv := range []*http.Server{n.http, n.metrics, n.hooks} {
		if srv != nil {
			_ = srv.Close()
		}
	}
	if n.ln != nil {
		_ = n.ln.Close()
	}
	if n.srv != nil {
		n.srv.Stop(ctx)
	}
	if n.upkeep != nil {
		n.upkeep.Stop(ctx)
	}
	if n.engine != nil {
		n.engine.Stop(ctx)
	}
	if n.api != nil {
		n.api.Stop(ctx)
	}
	if n.clock != nil {
		n.clock.Stop(ctx)
	}
	if n.audit != nil {
		n.audit.Stop(ctx)
	}
	if n.notifier != nil {
		n.notifier.Stop(ctx)
	}
	if n.cluster != nil {
		_ = n.cluster.Shutdown()
	}
	if n.listener != nil {
		n.listener.Stop(ctx)
	}
	if n.cancel != nil {
		n.cancel()
	}
	n.wg.Wait()
	n.store.Close()
}
