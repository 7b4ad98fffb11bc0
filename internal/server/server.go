// Package server is a broker node's WebSocket front: the sessions, the
// hello handshake and what other nodes tell this one (presence changes,
// commands, membership notices). The delivery engine that moves envelopes
// from Postgres to the sessions is internal/delivery, the HTTP routes are
// internal/httpapi. It owns this node's sockets and nothing else; what the
// cluster shares lives in Postgres (messages, members) and in the presence
// replica.
package server

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/admission"
	"github.com/claudemesh/broker/internal/audit"
	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/dbclock"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/members"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/ratelimit"
	"github.com/claudemesh/broker/internal/replay"
	"github.com/claudemesh/broker/internal/startstop"
	"github.com/claudemesh/broker/internal/store"
)

// Version is the broker's release version, reported by /health.
const Version = "0.1.0"

// Cluster is what the server needs from the gossip layer.
type Cluster interface {
	Send(node string, cmd presence.Command) error
	NumMembers() int
	Members() []presence.NodeInfo
}

// Deps are a server's collaborators.
type Deps struct {
	Config  *config.Config
	Store   *store.Store
	Replica *presence.Replica
	Cluster Cluster
	Engine  *delivery.Engine
	Audit   *audit.Writer
	Metrics *metrics.Metrics
	Logger  *slog.Logger
	// Clock is the node's view of Postgres' clock and health.
	Clock *dbclock.Clock
}

// Server is one broker node's WebSocket front; the engine it hands sends
// to and that pushes to its sessions is Deps.Engine.
type Server struct {
	cfg     *config.Config
	store   *store.Store
	replica *presence.Replica
	cluster Cluster
	m       *metrics.Metrics
	logger  *slog.Logger

	node    string // this node's name
	started time.Time

	members   *members.Cache
	revoking  *members.Revocations
	engine    *delivery.Engine
	hellos    *replay.Batcher
	audit     *audit.Writer
	helloRate *ratelimit.Keyed
	addrs     *clientaddr.Resolver

	clock    *dbclock.Clock
	draining atomic.Bool

	mu         sync.RWMutex
	sessions   map[*session]struct{}
	byPresence map[string]*session
	byMesh     map[string]map[*session]struct{}
	listeners  map[string]map[*session]struct{} // sessions that asked for system events, by mesh
	perAddr    *admission.Addrs                 // open and hello-less WebSockets by client address key
	slots      *admission.Slots                 // hellos between the cap check and register

	// loops runs the background loops and the work cluster callbacks
	// start (death confirmations, revocation checks); conns runs the
	// sessions, their writers and their pings. Each refuses new goroutines
	// once stopping, so a callback that arrives during a shutdown does not
	// race its wait.
	loops startstop.Base
	conns startstop.Base
	once  sync.Once

	// TestSignals are off unless a test turns them on.
	TestSignals TestSignals
}

var _ startstop.Service = (*Server)(nil)

// New creates a server. Call Start before serving.
func New(d Deps) *Server {
	s := &Server{
		cfg: d.Config, store: d.Store, replica: d.Replica, cluster: d.Cluster,
		m: d.Metrics, logger: d.Logger,
		engine: d.Engine, audit: d.Audit, clock: d.Clock,
		node:       d.Replica.Self(),
		started:    time.Now(),
		sessions:   map[*session]struct{}{},
		byPresence: map[string]*session{},
		byMesh:     map[string]map[*session]struct{}{},
		listeners:  map[string]map[*session]struct{}{},
		perAddr:    admission.NewAddrs(d.Config.ConnsPerAddr, d.Config.PendingPerAddr),
		slots:      admission.NewSlots(d.Replica, d.Config.MaxConnsPerMesh, d.Config.MaxSessionsPerMember),
	}
	s.members = members.New(d.Store, s.m.MemberCacheEvicted.Inc)
	s.members.Background = s.loops.Go // reloads behind sends end with the server
	s.hellos = replay.New(d.Store, 2)
	s.helloRate = ratelimit.New(d.Config.HelloRatePerSec, int(2*d.Config.HelloRatePerSec)+1, s.m.LimiterEvicted.Inc)
	s.addrs = clientaddr.FromConfig(d.Config.TrustedProxies, d.Config.ClientIPHeader, d.Logger)
	s.revoking = members.NewRevocations(members.RevocationsConfig{
		RevokedAmong: d.Store.RevokedAmong, Close: s.closeMember, Go: s.loops.Go,
		Refuted: func(n int) { s.m.RevocationsRefuted.Add(float64(n)) }, Logger: d.Logger,
	})
	return s
}

// Start launches the background loops (sweeps, pings, the Postgres health
// check) and the hello batcher, and opens the server to sessions.
func (s *Server) Start(ctx context.Context) error {
	run, ok := s.loops.StartInit(ctx)
	if !ok {
		return nil
	}
	s.conns.StartInit(run)
	if err := s.hellos.Start(run); err != nil {
		return err
	}
	s.loops.Go(s.sweepLoop)
	s.loops.Go(s.presenceLoop)
	return nil
}

// now is the cluster's time (dbclock).
func (s *Server) now() time.Time { return s.clock.Now() }

// Now is the cluster's time, for the HTTP routes.
func (s *Server) Now() time.Time { return s.clock.Now() }

// Stop is Shutdown without its error.
func (s *Server) Stop(ctx context.Context) { _ = s.Shutdown(ctx) }

// Name is this node's name.
func (s *Server) Name() string { return s.node }

// Started is when the server was made.
func (s *Server) Started() time.Time { return s.started }

// Sessions counts the authenticated sessions here.
func (s *Server) Sessions() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byPresence)
}

// DBHealthy reports whether Postgres answered the last health check.
func (s *Server) DBHealthy() bool { return s.clock.Healthy() }

// SetStatus applies a status to a session this node owns (a hook).
func (s *Server) SetStatus(presenceID, status, source string) {
	s.setStatus(presenceID, status, source)
}

// AcceptSignature records a signature against replay, cluster-wide.
func (s *Server) AcceptSignature(ctx context.Context, c store.HelloCheck) (store.HelloResult, error) {
	return s.hellos.Accept(ctx, c)
}

// HelloRate is the per-address budget of hellos, which the HTTP routes
// share.
func (s *Server) HelloRate() *ratelimit.Keyed { return s.helloRate }

// Members is the member cache the HTTP routes share.
func (s *Server) Members() *members.Cache { return s.members }

// Addrs resolves a request's client address.
func (s *Server) Addrs() *clientaddr.Resolver { return s.addrs }

// Drain stops accepting hellos, closes every session with 1001 after
// flushing its queued frames, and waits for their teardown (leases given
// back, disconnects audited), bounded by ctx: then the rest are cut.
func (s *Server) Drain(ctx context.Context) {
	s.draining.Store(true)
	all := s.localSessions()
	for _, ss := range all {
		ss.closeAfterFlush(1001, "shutdown")
	}
	for _, ss := range all {
		select {
		case <-ss.torn:
		case <-ctx.Done():
			ss.closeNow(1001, "shutdown")
		}
	}
}

// Shutdown drains sessions and stops the background loops, bounded by ctx.
// It is idempotent.
func (s *Server) Shutdown(ctx context.Context) error {
	var err error
	s.once.Do(func() {
		s.Drain(ctx)
		s.hellos.Stop(ctx)
		s.loops.Stop(ctx)
		if !s.conns.Stop(ctx) {
			// Out of time: a session may still be in its close handshake,
			// waiting for a peer that does not answer. Cut the sockets so
			// that its goroutines end now rather than after Shutdown.
			for _, ss := range s.localSessions() {
				_ = ss.conn.CloseNow()
			}
			cut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			s.conns.Stop(cut)
			cancel()
			err = errors.New("shutdown: sessions did not close in time; the rest were cut")
		}
		if !s.loops.Stop(ctx) && err == nil {
			err = errors.New("shutdown: background loops did not stop in time")
		}
	})
	return err
}

// localSessions returns a snapshot of this node's sessions.
func (s *Server) localSessions() []*session {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		out = append(out, ss)
	}
	return out
}

func (s *Server) sessionByPresence(id string) *session {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byPresence[id]
}

// Abort stops the server as a crash would: sockets are cut without a close
// handshake and nothing is flushed.
func (s *Server) Abort() {
	s.once.Do(func() {
		s.draining.Store(true)
		for _, ss := range s.localSessions() {
			_ = ss.conn.CloseNow()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.loops.Stop(ctx)
		s.hellos.Stop(ctx)
		s.conns.Stop(ctx)
	})
}
