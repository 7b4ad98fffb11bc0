// Package dbclock watches Postgres from one node: whether it answers (for
// /health and the recovery of work that failed while it was away) and how
// far this node's clock is from its clock. Hellos, hooks, invites and
// envelopes are judged by Postgres' time, so a node whose clock is off
// neither accepts stale ones nor refuses fresh ones. The WebSocket front,
// the HTTP routes and the delivery engine all read it.
package dbclock

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/startstop"
)

// Store answers with Postgres' clock (store.Store).
type Store interface {
	Now(ctx context.Context) (time.Time, error)
}

// Clock is the node's view of Postgres.
type Clock struct {
	startstop.Base
	store  Store
	m      *metrics.Metrics
	logger *slog.Logger
	local  func() time.Time
	// OnHealthy runs when Postgres answers again after an outage (the
	// engine re-scans for work that failed meanwhile). Set before Start.
	OnHealthy func()
	// Warm, when set, runs when Postgres answers again, before the node
	// reports healthy: it reopens the pools' connections and prepares their
	// statements, so the first requests after the outage pay no set-up.
	// Until it succeeds the node stays unhealthy. Set before Start.
	Warm func(ctx context.Context) error

	offset  atomic.Int64 // Postgres clock minus ours, in ns
	healthy atomic.Bool
}

var _ startstop.Service = (*Clock)(nil)

// New makes a clock over local (time.Now when nil), healthy until a check
// fails.
func New(st Store, local func() time.Time, m *metrics.Metrics, logger *slog.Logger) *Clock {
	if local == nil {
		local = time.Now
	}
	c := &Clock{store: st, m: m, logger: logger, local: local}
	c.healthy.Store(true)
	m.DBHealthy.Set(1)
	return c
}

// Start measures the offset once (from the first request on, timestamps
// are judged by Postgres' clock) and then checks every second.
func (c *Clock) Start(ctx context.Context) error {
	run, ok := c.StartInit(ctx)
	if !ok {
		return nil
	}
	_ = c.sync(run)
	c.Go(c.loop)
	return nil
}

// Stop ends the checks.
func (c *Clock) Stop(ctx context.Context) { c.Base.Stop(ctx) }

// Now is the cluster's time: this node's clock corrected by its measured
// offset from Postgres.
func (c *Clock) Now() time.Time { return c.local().Add(time.Duration(c.offset.Load())) }

// Healthy reports whether Postgres answered the last check.
func (c *Clock) Healthy() bool { return c.healthy.Load() }

// loop pings Postgres and logs transitions.
func (c *Clock) loop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		err := c.sync(ctx)
		if ctx.Err() != nil {
			return
		}
		was := c.healthy.Load()
		switch {
		case err == nil && !was:
			if c.Warm != nil {
				wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				werr := c.Warm(wctx)
				cancel()
				if werr != nil {
					c.logger.Warn("db back, pool not warm yet", "err", werr)
					continue
				}
			}
			c.healthy.Store(true)
			c.m.DBHealthy.Set(1)
			c.logger.Info("db healthy")
			if c.OnHealthy != nil {
				c.OnHealthy()
			}
		case err != nil && was:
			c.healthy.Store(false)
			c.m.DBHealthy.Set(0)
			c.logger.Error("db ping failed", "err", err)
		}
	}
}

// sync asks Postgres for its time and records this node's offset from it;
// the error is Postgres'.
func (c *Clock) sync(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	t0 := c.local()
	dbNow, err := c.store.Now(cctx)
	t1 := c.local()
	if err != nil {
		return err
	}
	c.note(dbNow, t0, t1)
	return nil
}

// warnAt is the clock offset from Postgres beyond which the node warns.
const warnAt = 2 * time.Second

// note records this node's offset from Postgres' clock, measured by a
// query sent at t0 and answered at t1 (local clock).
func (c *Clock) note(dbNow, t0, t1 time.Time) {
	rtt := t1.Sub(t0)
	if rtt > time.Second {
		return // too slow to measure anything useful
	}
	offset := dbNow.Sub(t0.Add(rtt / 2))
	prev := time.Duration(c.offset.Swap(int64(offset)))
	c.m.ClockOffset.Set(offset.Seconds())
	if abs(offset) > warnAt && abs(prev-offset) > warnAt/2 {
		c.logger.Warn("node clock differs from Postgres; using Postgres time for hellos and hooks", "offset", offset.Round(time.Millisecond))
	}
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
