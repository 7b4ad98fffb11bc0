package server

import (
	"context"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
)

// healthLoop pings Postgres and logs transitions.
func (s *Server) healthLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		err := s.syncClock(ctx)
		if ctx.Err() != nil {
			return
		}
		was := s.dbHealthy.Load()
		switch {
		case err == nil && !was:
			s.dbHealthy.Store(true)
			s.m.DBHealthy.Set(1)
			s.logger.Info("db healthy")
			// Work that failed while Postgres was away may be waiting.
			s.engine.WakeAll(delivery.ReasonSweep)
		case err != nil && was:
			s.dbHealthy.Store(false)
			s.m.DBHealthy.Set(0)
			s.logger.Error("db ping failed", "err", err)
		}
	}
}

// syncClock asks Postgres for its time and records this node's offset
// from it; the error is Postgres'.
func (s *Server) syncClock(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	t0 := s.clock()
	dbNow, err := s.store.Now(cctx)
	t1 := s.clock()
	if err != nil {
		return err
	}
	s.noteClock(dbNow, t0, t1)
	return nil
}

// clockWarn is the clock offset from Postgres beyond which the node warns.
const clockWarn = 2 * time.Second

// noteClock records this node's offset from Postgres' clock, measured by a
// query sent at t0 and answered at t1 (local clock).
func (s *Server) noteClock(dbNow, t0, t1 time.Time) {
	rtt := t1.Sub(t0)
	if rtt > time.Second {
		return // too slow to measure anything useful
	}
	offset := dbNow.Sub(t0.Add(rtt / 2))
	prev := time.Duration(s.clockOffset.Swap(int64(offset)))
	s.m.ClockOffset.Set(offset.Seconds())
	if abs(offset) > clockWarn && abs(prev-offset) > clockWarn/2 {
		s.logger.Warn("node clock differs from Postgres; using Postgres time for hellos and hooks", "offset", offset.Round(time.Millisecond))
	}
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
