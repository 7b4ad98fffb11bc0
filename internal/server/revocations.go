package server

import (
	"context"
	"sync"
	"time"
)

// revocations holds members named by revocation notices, waiting for the
// database to confirm; at most one checker runs (running).
type revocations struct {
	mu      sync.Mutex
	pending map[string]struct{}
	running bool
}

// checkRevocation confirms a revocation notice before acting on it. Any
// database role can NOTIFY on the member channel, and a close 1008
// unauthorized is final for clients: a forged notice must close nobody.
// Members with no session here are ignored (nothing to close, and a flood
// of notices for invented ids costs no query); the rest wait in a set that
// one checker drains, one query per round, however many notices came. The
// periodic checkRevoked stays the safety net for notices never received.
func (s *Server) checkRevocation(member string) {
	if s.loops.Context().Err() != nil || !s.engine.HasLocal(member) {
		return
	}
	c := &s.revoking
	c.mu.Lock()
	if c.pending == nil {
		c.pending = map[string]struct{}{}
	}
	c.pending[member] = struct{}{}
	start := !c.running
	c.running = true
	c.mu.Unlock()
	if start && !s.loops.Go(s.revocationLoop) {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
	}
}

// revocationLoop checks pending revocation notices against the database
// until none is left.
func (s *Server) revocationLoop(ctx context.Context) {
	c := &s.revoking
	for {
		c.mu.Lock()
		pending := c.pending
		c.pending = nil
		if len(pending) == 0 || ctx.Err() != nil {
			c.running = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		ids := make([]string, 0, len(pending))
		for id := range pending {
			ids = append(ids, id)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		revoked, err := s.store.RevokedAmong(cctx, ids)
		cancel()
		if err != nil {
			// The periodic check closes them once Postgres answers.
			s.logger.Warn("checking revocation notices failed; the periodic check will retry", "err", err, "members", len(ids))
			continue
		}
		for _, id := range revoked {
			delete(pending, id)
			s.closeMember(id, "revoked")
		}
		if len(pending) > 0 {
			s.m.RevocationsRefuted.Add(float64(len(pending)))
			s.logger.Warn("revocation notice for members that are not revoked; ignored", "members", len(pending))
		}
	}
}
