// Package maintenance runs a node's periodic upkeep that is not about its
// sockets: the queue depth gauge, purging delivered messages and old audit
// events, and forgetting idle rate limiters and member lists.
package maintenance

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/broker/internal/startstop"
)

// Store is what the upkeep reads and purges (store.Store).
type Store interface {
	QueueDepth(ctx context.Context) (int64, error)
	Purge(ctx context.Context, retention time.Duration, limit int) (int64, error)
	PurgeAudit(ctx context.Context, retention time.Duration, limit int) (int64, error)
}

// purgeBatch bounds the rows one purge deletes.
const purgeBatch = 10000

// Config configures a Worker. Zero intervals take the defaults (10 s for
// the depth, a minute for the purges).
type Config struct {
	DeliveredRetention time.Duration // delivered rows are kept this long (DELIVERED_RETENTION)
	AuditRetention     time.Duration // audit events are kept this long (AUDIT_RETENTION)
	DepthInterval      time.Duration
	PurgeInterval      time.Duration
}

// Deps are a Worker's collaborators. Depth and GC are optional.
type Deps struct {
	Store  Store
	Depth  func(n int64) // the queue depth gauge
	GC     []func()      // run after every purge: idle limiters, stale member lists
	Logger *slog.Logger
}

// Worker runs the upkeep on one goroutine, from Start until Stop.
type Worker struct {
	startstop.Base
	cfg  Config
	deps Deps
}

var _ startstop.Service = (*Worker)(nil)

// New makes a worker; nothing runs until Start.
func New(cfg Config, d Deps) *Worker {
	if cfg.DepthInterval <= 0 {
		cfg.DepthInterval = 10 * time.Second
	}
	if cfg.PurgeInterval <= 0 {
		cfg.PurgeInterval = time.Minute
	}
	return &Worker{cfg: cfg, deps: d}
}

// Start launches the upkeep loop.
func (w *Worker) Start(ctx context.Context) error {
	if _, ok := w.StartInit(ctx); ok {
		w.Go(w.loop)
	}
	return nil
}

// Stop stops the loop and waits for it, at most until ctx ends.
func (w *Worker) Stop(ctx context.Context) { w.Base.Stop(ctx) }

func (w *Worker) loop(ctx context.Context) {
	depthTick := time.NewTicker(w.cfg.DepthInterval)
	purgeTick := time.NewTicker(w.cfg.PurgeInterval)
	defer func() {
		depthTick.Stop()
		purgeTick.Stop()
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-depthTick.C:
			w.depth(ctx)
		case <-purgeTick.C:
			w.purge(ctx)
		}
	}
}

// depth sets the queue depth gauge; a failed count leaves it as it was.
func (w *Worker) depth(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if n, err := w.deps.Store.QueueDepth(cctx); err == nil && w.deps.Depth != nil {
		w.deps.Depth(n)
	}
}

// purge deletes delivered messages and audit events past their retention,
// a batch of each, then runs the GC functions.
func (w *Worker) purge(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	if _, err := w.deps.Store.Purge(cctx, w.cfg.DeliveredRetention, purgeBatch); err != nil && ctx.Err() == nil {
		w.deps.Logger.Warn("purge failed", "err", err)
	}
	if _, err := w.deps.Store.PurgeAudit(cctx, w.cfg.AuditRetention, purgeBatch); err != nil && ctx.Err() == nil {
		w.deps.Logger.Warn("audit purge failed", "err", err)
	}
	cancel()
	for _, gc := range w.deps.GC {
		gc()
	}
}
