package server

import (
	"context"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/protocol"
)

// presenceLoop runs every second (more often with short ping intervals):
// pings, stale sockets, grace expiry.
func (s *Server) presenceLoop(ctx context.Context) {
	tick := time.NewTicker(min(time.Second, s.cfg.PingInterval/2))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		s.pingSessions()
		s.replica.Expire()
		s.m.PresenceEntries.Set(float64(s.replica.Len()))
		s.m.ClusterMembers.Set(float64(s.cluster.NumMembers()))
	}
}

// pingSessions pings sessions that are due and closes those that have not
// answered a ping within PONG_TIMEOUT.
func (s *Server) pingSessions() {
	now := time.Now()
	for _, ss := range s.localSessions() {
		if !ss.authed.Load() || ss.isClosing() {
			continue
		}
		if now.Sub(time.Unix(0, ss.lastPong.Load())) > s.cfg.PongTimeout {
			ss.log().Info("closing stale session: no pong")
			ss.closeNow(websocket.StatusPolicyViolation, protocol.CloseReasonStale)
			continue
		}
		if now.UnixNano() < ss.nextPing.Load() {
			continue
		}
		ss.nextPing.Store(now.Add(s.cfg.PingInterval).UnixNano())
		s.conns.Go(func(context.Context) {
			ctx, cancel := context.WithTimeout(ss.ctx, s.cfg.PongTimeout)
			defer cancel()
			if ss.conn.Ping(ctx) == nil {
				ss.lastPong.Store(time.Now().UnixNano())
			}
		})
	}
}

// sweepLoop runs the slower periodic jobs about this node's sessions (the
// rest of the upkeep is internal/maintenance's).
func (s *Server) sweepLoop(ctx context.Context) {
	statusTick := time.NewTicker(5 * time.Second)
	revokeTick := time.NewTicker(s.cfg.RevokeCheck)
	defer func() {
		statusTick.Stop()
		revokeTick.Stop()
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-statusTick.C:
			s.sweepStatuses()
		case <-revokeTick.C:
			s.checkRevoked(ctx)
		}
	}
}

// sweepStatuses flips this node's sessions stuck in "working" for longer
// than STATUS_TTL_SECONDS back to idle (source jsonl).
func (s *Server) sweepStatuses() {
	s.m.TTLSweeps.Inc()
	cut := s.now().Add(-s.cfg.StatusTTL()).UnixMilli()
	for _, e := range s.replica.Own() {
		if e.IsLive() && e.Status == protocol.StatusWorking && e.StatusUpdatedAt < cut {
			s.setStatus(e.PresenceID, protocol.StatusIdle, protocol.SourceJSONL)
			s.m.StatusFlips.Inc()
		}
	}
}
