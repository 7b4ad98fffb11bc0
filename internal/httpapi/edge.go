package httpapi

import (
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/clientaddr"
)

// What a request may cost before anything is checked: deadlines for
// requests other than WebSocket upgrades, and the bearer token of
// /metrics.

// bounded gives every request other than a WebSocket upgrade
// HTTP_READ_TIMEOUT to send its body and three times that to be answered
// (a join waits for Postgres, the status page for the other nodes), so a
// slow client holds a goroutine for a bounded time. (A WebSocket is not
// bounded so; had a kept-alive connection carried deadlines into its
// upgrade, net/http clears them when the connection is hijacked.)
func (a *API) bounded(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" {
			rc := http.NewResponseController(w)
			now := time.Now()
			_ = rc.SetReadDeadline(now.Add(a.cfg.HTTPReadTimeout))
			_ = rc.SetWriteDeadline(now.Add(3 * a.cfg.HTTPReadTimeout))
			// Past the limit the connection is closed after the answer
			// instead of being drained.
			r.Body = http.MaxBytesReader(w, r.Body, int64(a.cfg.MaxMessageBytes)+1)
		}
		next.ServeHTTP(w, r)
	})
}

// RequireMetricsToken lets through requests that carry
// "Authorization: Bearer <METRICS_TOKEN>" (all of them when it is unset).
func (a *API) RequireMetricsToken(next http.Handler) http.Handler {
	token := a.cfg.MetricsToken
	if token == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !secretEqual(strings.TrimSpace(bearer), token) {
			if !a.helloRate.Allow("metrics/" + a.addrs.Request(r).Key()) {
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
