package server

import (
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
)

// ClientAck reports whether the session acks its pushes itself (the
// client_ack capability): the delivery engine may then take over at once
// what its previous connection held, since a push made twice is deduped.
func (ss *session) ClientAck() bool { return ss.clientAck }

// replacedConn names the connection a reattaching session replaces, for
// the engine's lease takeover (delivery/takeover.go).
func replacedConn(prev presence.Entry, hasPrev bool) []delivery.Replaced {
	if !hasPrev || prev.ConnID == "" {
		return nil
	}
	return []delivery.Replaced{{Conn: prev.ConnID, Node: prev.Owner}}
}
