package server

import (
	"net/http"

	"github.com/claudemesh/broker/internal/clientaddr"
)

// What a request may cost before anything is checked: the client address
// every per-address limit counts by (clientaddr.FromConfig; the
// per-address socket caps are admission.Addrs).

// clientAddr is the request's client: the socket peer, or whom a trusted
// proxy names.
func (s *Server) clientAddr(r *http.Request) clientaddr.Addr { return s.addrs.Request(r) }
