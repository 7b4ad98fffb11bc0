package server

import (
	"context"
	"time"
)

// checkRevocation confirms a revocation notice before acting on it. Any
// database role can NOTIFY on the member channel, and a close 1008
// unauthorized is final for clients: a forged notice must close nobody.
// Members with no session here are ignored (nothing to close, and a flood
// of notices for invented ids costs no query); the rest wait in a set that
// one checker drains, one query per round, however many notices came. The
// periodic checkRevoked stays the safety net for notices never received.
func (s *Server) checkRevocation(member string) {
	if s.ctx.Err() != nil || !s.engine.hasLocal(member) {
		return
	}
	c := s.members
	c.revMu.Lock()
	if c.revoking == nil {
		c.revoking = map[string]struct{}{}
	}
	c.revoking[member] = struct{}{}
	start := !c.revRunning
	c.revRunning = true
	c.revMu.Unlock()
	if start {
		s.wg.Add(1)
		go s.revocationLoop()
	}
}

// revocationLoop checks pending revocation notices against the database
// until none is left.
func (s *Server) revocationLoop() {
	defer s.wg.Done()
	c := s.members
	for {
		c.revMu.Lock()
		pending := c.revoking
		c.revoking = nil
		if len(pending) == 0 || s.ctx.Err() != nil {
			c.revRunning = false
			c.revMu.Unlock()
			return
		}
		c.revMu.Unlock()
		ids := make([]string, 0, len(pending))
		for id := range pending {
			ids = append(ids, id)
		}
		ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
		revoked, err := s.store.RevokedAmong(ctx, ids)
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
