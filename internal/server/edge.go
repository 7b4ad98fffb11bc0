package server

import (
	"log/slog"
	"net/http"

	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
)

// What a request may cost before anything is checked: the client address
// every per-address limit counts by (the per-address socket caps are
// admission.Addrs).

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
