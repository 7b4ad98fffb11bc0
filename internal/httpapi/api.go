// Package httpapi is a node's HTTP routes other than the WebSocket: status
// hooks, joins, /health, the operator status page and /metrics. It reads
// the node through small interfaces (its front, the presence replica, the
// gossip layer, the store); the only things it asks of the node are to
// apply a hook's status to a session it owns and to remember a hook's
// signature against replay.
package httpapi

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/ratelimit"
	"github.com/claudemesh/broker/internal/startstop"
	"github.com/claudemesh/broker/internal/store"
)

// Version is the broker's release version, reported by /health.
const Version = "0.1.0"

// Node is what the routes read of this node's WebSocket front
// (server.Server), plus the two things hooks ask of it.
type Node interface {
	Name() string
	Started() time.Time
	Sessions() int   // authenticated sessions here
	DBHealthy() bool // Postgres answered the last health check
	Now() time.Time  // the cluster's clock (Postgres-corrected)
	// SetStatus applies a hook's status to a session this node owns.
	SetStatus(presenceID, status, source string)
	// AcceptSignature records a signature against replay, cluster-wide;
	// Fresh is false when it was seen before.
	AcceptSignature(ctx context.Context, c store.HelloCheck) (store.HelloResult, error)
}

// Presence is what the routes read of the presence replica.
type Presence interface {
	Find(pred func(*presence.Entry) bool) []presence.Entry
	Meshes() []string
	Live(mesh string) []presence.Entry
}

// Cluster is what the routes read of the gossip layer; Send forwards a
// hook to the node that owns its session.
type Cluster interface {
	NumMembers() int
	Members() []presence.NodeInfo
	Send(node string, cmd presence.Command) error
}

// Store is what the routes read and write in Postgres.
type Store interface {
	AddPendingStatus(ctx context.Context, pid int64, cwd, status, meshID, pubkey string) error
	GetMesh(ctx context.Context, id string) (store.Mesh, error)
	InviteByToken(ctx context.Context, tokenKey string) (store.Invite, error)
	RedeemInvite(ctx context.Context, inv store.Invite, pubkey, displayName string) (store.Member, bool, error)
	QueueDepth(ctx context.Context) (int64, error)
	RecentNodes(ctx context.Context, within time.Duration) ([]store.Node, error)
	ListAudit(ctx context.Context, meshID, eventType string, limit int) ([]store.AuditEvent, error)
}

// Members is the member cache (members.Cache).
type Members interface {
	ByPubkey(ctx context.Context, mesh, pubkey string) (store.Member, error)
	Invalidate(mesh string)
}

// Auditor records events (audit.Writer).
type Auditor interface {
	Add(e store.AuditEvent)
}

// Deps are the routes' collaborators.
type Deps struct {
	Config  *config.Config
	Node    Node
	Replica Presence
	Cluster Cluster
	Store   Store
	Members Members
	Audit   Auditor
	// HelloRate is the per-address budget the WebSocket front's hellos
	// share (keys are prefixed by route).
	HelloRate *ratelimit.Keyed
	Addrs     *clientaddr.Resolver
	Metrics   *metrics.Metrics
	Gatherer  prometheus.Gatherer
	Logger    *slog.Logger
}

// API serves the routes.
type API struct {
	startstop.Base
	cfg       *config.Config
	node      Node
	replica   Presence
	cluster   Cluster
	store     Store
	members   Members
	audit     Auditor
	helloRate *ratelimit.Keyed
	hookRate  *ratelimit.Keyed
	addrs     *clientaddr.Resolver
	m         *metrics.Metrics
	gatherer  prometheus.Gatherer
	logger    *slog.Logger
}

// New makes the routes.
func New(d Deps) *API {
	return &API{cfg: d.Config, node: d.Node, replica: d.Replica, cluster: d.Cluster, store: d.Store, members: d.Members,
		audit: d.Audit, helloRate: d.HelloRate, addrs: d.Addrs, m: d.Metrics, gatherer: d.Gatherer, logger: d.Logger,
		hookRate: ratelimit.New(float64(d.Config.HookRateLimitPerMin)/60, d.Config.HookRateLimitPerMin, d.Metrics.LimiterEvicted.Inc)}
}

// Handler returns the node's public routes, ws serving GET /ws.
func (a *API) Handler(ws http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /ws", ws)
	mux.HandleFunc("POST /hook/set-status", a.serveHook)
	mux.HandleFunc("POST /join", a.serveJoin)
	mux.HandleFunc("GET /health", a.serveHealth)
	if a.cfg.MetricsAddr == "" {
		mux.Handle("GET /metrics", a.MetricsHandler())
	}
	a.statusRoutes(mux)
	return a.bounded(mux)
}

// LocalHookHandler serves HOOK_LOCAL_ADDR: POST /hook/set-status, where
// unsigned hooks are accepted. It must only ever be served on a loopback
// listener (node checks both the bind address and each peer).
func (a *API) LocalHookHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /hook/set-status", a.serveLocalHook)
	return a.bounded(mux)
}

// MetricsHandler serves the Prometheus exposition; with METRICS_TOKEN it
// takes only "Authorization: Bearer <METRICS_TOKEN>".
func (a *API) MetricsHandler() http.Handler {
	return a.RequireMetricsToken(promhttp.HandlerFor(a.gatherer, promhttp.HandlerOpts{}))
}

var _ startstop.Service = (*API)(nil)

// Start runs the routes' upkeep: idle rate-limit buckets are forgotten.
func (a *API) Start(ctx context.Context) error {
	if _, ok := a.StartInit(ctx); !ok {
		return nil
	}
	a.Go(func(ctx context.Context) {
		tick := time.NewTicker(time.Minute)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				a.hookRate.GC(5 * time.Minute)
			}
		}
	})
	return nil
}

// Stop ends the upkeep.
func (a *API) Stop(ctx context.Context) { a.Base.Stop(ctx) }
