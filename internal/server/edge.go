package server

import (
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"time"

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

// bounded gives every request other than a WebSocket upgrade
// HTTP_READ_TIMEOUT to send its body and three times that to be answered
// (a join waits for Postgres, the status page for the other nodes), so a
// slow client holds a goroutine for a bounded time. (A WebSocket is not
// bounded so; had a kept-alive connection carried deadlines into its
// upgrade, net/http clears them when the connection is hijacked.)
func (s *Server) bounded(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" {
			rc := http.NewResponseController(w)
			now := time.Now()
			_ = rc.SetReadDeadline(now.Add(s.cfg.HTTPReadTimeout))
			_ = rc.SetWriteDeadline(now.Add(3 * s.cfg.HTTPReadTimeout))
			// Past the limit the connection is closed after the answer
			// instead of being drained.
			r.Body = http.MaxBytesReader(w, r.Body, int64(s.cfg.MaxMessageBytes)+1)
		}
		next.ServeHTTP(w, r)
	})
}

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

// RequireMetricsToken lets through requests that carry
// "Authorization: Bearer <METRICS_TOKEN>" (all of them when it is unset).
func (s *Server) RequireMetricsToken(next http.Handler) http.Handler {
	token := s.cfg.MetricsToken
	if token == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !secretEqual(strings.TrimSpace(bearer), token) {
			if !s.helloRate.Allow("metrics/" + s.clientAddr(r).Key()) {
				http.Error(w, "too many attempts", http.StatusTooManyRequests)
				return
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="claudemesh metrics"`)
			http.Error(w, "unauthorized: send Authorization: Bearer <METRICS_TOKEN>", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// localPeer reports whether a request on the local hook listener comes
// from this machine. The listener binds loopback only (config checks it);
// this is a second lock, not a defence against a proxy someone puts in
// front of that port (its peer is loopback too): never put one there.
func localPeer(r *http.Request) (netip.Addr, bool) {
	ip := clientaddr.Peer(r.RemoteAddr)
	return ip, ip.IsValid() && ip.IsLoopback()
}
