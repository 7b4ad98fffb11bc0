package server

import (
	"strconv"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/presence"
)

// peersListLimit bounds a peers_list frame. Clients read frames of at most
// 1 MiB (ours, and the original's WebSocket defaults), and one that cannot
// read the answer to its own list_peers is disconnected by it.
const peersListLimit = 1 << 20

// list_peers is answered at most peersRate times a second per session
// (burst peersBurst). A request over the rate waits in the session's read
// loop, so a client that floods list_peers only slows itself: TCP pushes
// back on it, and its other frames wait behind.
const (
	peersRate  = 2
	peersBurst = 5
)

// allowListPeers waits until the session may have another peers_list. The
// limiter is made on the first request: most sessions never ask.
// Called from the read loop only.
func (ss *session) allowListPeers() bool {
	if ss.peersLimit == nil {
		ss.peersLimit = rate.NewLimiter(peersRate, peersBurst)
	}
	if ss.peersLimit.Allow() {
		return true
	}
	ss.s.m.ListPeersThrottled.Inc()
	return ss.peersLimit.Wait(ss.ctx) == nil
}

// peersListReply is the frame answering list_peers: every visible live
// session of the mesh, cluster-wide.
func (ss *session) peersListReply(reqID string) []byte {
	frame, how := presence.EncodePeersList(reqID, ss.s.replica.Live(ss.meshID), peersListLimit)
	if how != "" {
		ss.s.m.PeersTrimmed.WithLabelValues(how).Inc()
		if how == "cut" {
			ss.log().Warn("peers_list cut to fit 1 MiB", "bytes", len(frame), "max_connections_per_mesh", strconv.Itoa(ss.s.cfg.MaxConnsPerMesh))
		}
	}
	return frame
}
