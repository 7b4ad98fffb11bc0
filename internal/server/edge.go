package server

import (
	"log/slog"
	"net/http"

	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
)

// What a request may cost before anything is checked: the client address
// every per-address limit counts by, deadlines for requests other than
// WebSocket upgrades, the per-address socket caps, and the bearer token of
// /metrics.

func newResolver(cfg *config.Config, logger *slog.Logger) *clientaddr.Resolver {
	trusted, err := clientaddr.ParseTrusted(cfg.TrustedProxies)
	if err != nil {
		// Validate refuses this at start-up; a Config built by hand that
		// skipped it trusts nobody rather than everybody.
		logger.Error("TRUSTED_PROXIES ignored", "err", err)
		trusted = nil
	}
	r, err := clientaddr.New(trusted, cfg.ClientIPHeader)
	if err != nil {
		logger.Error("CLIENT_IP_HEADER ignored", "err", err)
		r, _ = clientaddr.New(trusted, "")
	}
	return r
}

// clientAddr is the request's client: the socket peer, or whom a trusted
// proxy names.
func (s *Server) clientAddr(r *http.Request) clientaddr.Addr { return s.addrs.Request(r) }

// admitConn counts a new WebSocket of the client address key, or reports
// why it is refused: the address has MAX_CONNECTIONS_PER_ADDR open, or
// MAX_PENDING_CONNECTIONS_PER_ADDR that have not said hello yet (idle
// sockets must not fill the first cap for everyone behind the address).
func (s *Server) admitConn(key string) (refused string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.perAddr[key] >= s.cfg.ConnsPerAddr:
		return "too many connections from this address"
	case s.pending[key] >= s.cfg.PendingPerAddr:
		return "too many connections from this address waiting for their hello"
	}
	s.perAddr[key]++
	s.pending[key]++
	return ""
}

// connAuthed moves a socket of key from pending to authenticated.
func (s *Server) connAuthed(key string) {
	s.mu.Lock()
	decr(s.pending, key)
	s.mu.Unlock()
}

// releaseConn forgets a closed socket of key.
func (s *Server) releaseConn(key string, authed bool) {
	s.mu.Lock()
	decr(s.perAddr, key)
	if !authed {
		decr(s.pending, key)
	}
	s.mu.Unlock()
}

func decr(m map[string]int, key string) {
	if m[key]--; m[key] <= 0 {
		delete(m, key)
	}
}
