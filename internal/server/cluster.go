package server

import (
	"context"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// PresenceChanged observes the presence replica: it closes local sockets
// whose session moved to another connection, and turns joins, leaves and
// status changes into system events for this node's sessions. Every node
// does the same for its own sessions, so events reach the whole cluster.
func (s *Server) PresenceChanged(changes []presence.Change) {
	for _, ch := range changes {
		cur, prev := ch.Cur, ch.Prev
		if ss := s.sessionByPresence(cur.PresenceID); ss != nil && cur.ConnID != ss.id && ss.authed.Load() {
			// A newer connection of this session took over (here or on
			// another node).
			if cur.Present() {
				ss.replaced()
			}
		}
		if cur.IsLive() && cur.Owner != s.node {
			s.resolveDuplicateSession(cur)
		}
		var event string
		switch {
		case cur.Ephemeral:
			// Short-lived connections announce nothing.
		case prev == nil && cur.IsLive():
			event = protocol.EventPeerJoined
		case prev != nil && !cur.Present():
			event = protocol.EventPeerLeft
		case prev != nil && cur.Present() && prev.Status != cur.Status:
			event = protocol.EventPeerStatus
		}
		if event != "" {
			s.systemEvent(cur, event)
		}
	}
	s.m.PresenceEntries.Set(float64(s.replica.Len()))
}

// resolveDuplicateSession handles two live connections of one session on
// different nodes with different presence ids (both connected before either
// saw the other): the newer epoch keeps the session.
func (s *Server) resolveDuplicateSession(remote *presence.Entry) {
	for _, ss := range s.meshSessions(remote.MeshID) {
		if ss.memberID != remote.MemberID || ss.sessionID != remote.SessionID || ss.presenceID == remote.PresenceID {
			continue
		}
		mine, ok := s.replica.Get(ss.presenceID)
		if !ok || mine.Epoch > remote.Epoch || (mine.Epoch == remote.Epoch && mine.Owner > remote.Owner) {
			continue
		}
		s.replica.Remove(ss.presenceID)
		ss.replaced()
	}
}

// systemEvent pushes a peer event to this node's other sessions of the mesh
// that asked for system events.
func (s *Server) systemEvent(e *presence.Entry, event string) {
	s.mu.RLock()
	targets := make([]*session, 0, len(s.listeners[e.MeshID]))
	for ss := range s.listeners[e.MeshID] {
		targets = append(targets, ss)
	}
	s.mu.RUnlock()
	if len(targets) == 0 {
		return
	}
	frame := e.SystemPush(event, time.Now())
	for _, ss := range targets {
		if ss.presenceID != e.PresenceID {
			ss.evMu.Lock()
			ss.queueRaw(frameData(frame))
			ss.evMu.Unlock()
		}
	}
}

func addToSet(m map[string]map[*session]struct{}, key string, ss *session) {
	set := m[key]
	if set == nil {
		set = map[*session]struct{}{}
		m[key] = set
	}
	set[ss] = struct{}{}
}

func removeFromSet(m map[string]map[*session]struct{}, key string, ss *session) {
	if set := m[key]; set != nil {
		delete(set, ss)
		if len(set) == 0 {
			delete(m, key)
		}
	}
}

func frameData(b []byte) frame { return frame{data: b} }

// meshSessions lists this node's authenticated sessions of a mesh.
func (s *Server) meshSessions(mesh string) []*session {
	s.mu.RLock()
	defer s.mu.RUnlock()
	set := s.byMesh[mesh]
	out := make([]*session, 0, len(set))
	for ss := range set {
		out = append(out, ss)
	}
	return out
}

// setStatus applies a status report to a session this node owns and
// releases held messages when its status now accepts more.
func (s *Server) setStatus(presenceID, status, source string) (presence.Entry, bool) {
	var before, after int
	ss := s.sessionByPresence(presenceID)
	e, changed := s.replica.Update(presenceID, func(e *presence.Entry) bool {
		before = e.MaxPriority()
		ok := presence.ApplyStatus(e, status, source, s.now(), s.cfg.HookFresh())
		after = e.MaxPriority()
		// The session's gate changes before the new status is gossiped:
		// once another node sees "working", no "next" may be claimed here.
		if ss != nil {
			ss.maxPrio.Store(int32(after))
		}
		return ok
	})
	if e.PresenceID == "" {
		return e, false
	}
	if after > before {
		s.engine.Wake(delivery.ReasonStatus, e.MemberID)
	}
	if changed {
		s.audit.Add(store.AuditEvent{MeshID: e.MeshID, Type: store.EventStatusChanged, Actor: e.MemberID,
			Target: presenceID, Metadata: map[string]any{"status": e.Status, "source": e.StatusSource}})
	}
	return e, changed
}

// HandleCommand runs a command another node sent to this owner. The
// gossip layer has checked it (a hook with a valid status, for a presence
// this node owns); the checks are repeated here for commands from this
// node itself.
func (s *Server) HandleCommand(cmd presence.Command) {
	switch cmd.Kind {
	case "hook":
		if !protocol.ValidStatus(cmd.Status) || !s.replica.Owns(cmd.PresenceID) {
			s.m.GossipCommandsDropped.Inc()
			return
		}
		e, _ := s.setStatus(cmd.PresenceID, cmd.Status, protocol.SourceHook)
		s.logger.Info("hook applied", "presence_id", cmd.PresenceID, "status", e.Status, "from", cmd.From)
	default:
		s.logger.Warn("unknown cluster command", "kind", cmd.Kind, "from", cmd.From)
	}
}

// deathConfirm is how long a node must stay gone before its leases are
// released. Gossip can declare a busy node dead by mistake; it then refutes
// within a second or two, and releasing its leases meanwhile would only
// make it push its in-flight messages twice.
const deathConfirm = 5 * time.Second

// NodeEvent reacts to a node joining or leaving the cluster: the leases of
// a departed node are released once its departure is confirmed, so its
// peers' messages move long before the leases would run out.
func (s *Server) NodeEvent(ev presence.NodeEvent) {
	if ev.Up {
		return
	}
	// Refused once the server stops: a gossip event arriving during a
	// shutdown has nothing left to release.
	s.loops.Go(func(ctx context.Context) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(deathConfirm):
		}
		for _, m := range s.cluster.Members() {
			if m.Name == ev.Name && m.Incarnation == ev.Incarnation && m.State == "alive" {
				s.logger.Info("node declared dead came back; keeping its leases", "peer", ev.Name)
				return
			}
		}
		s.engine.ReleaseNode(ctx, ev.Name, ev.Incarnation)
	})
}

// RelayListening runs after every (re)LISTEN: member lists expire, so
// hellos and hooks reload them before use (a revocation announced
// meanwhile would otherwise wait for their TTL) while sends reload them
// behind themselves, and the engine re-scans for anything notified while
// the listener was away.
func (s *Server) RelayListening() {
	s.m.RelayReconnects.Inc()
	s.members.ExpireAll()
	s.engine.RelayListening()
}

// MemberChanged handles a membership change: "meshId", or
// "meshId|memberId|revoked". Any database role may send one, so it is a
// hint: the mesh's member list is reloaded, and a revocation closes
// sessions only once the database confirms it (checkRevocation).
func (s *Server) MemberChanged(payload string) {
	mesh, rest, hasMember := strings.Cut(payload, "|")
	if !validNotifyID(mesh) {
		s.m.RelayRejected.WithLabelValues("malformed").Inc()
		return
	}
	s.members.Invalidate(mesh)
	if !hasMember {
		return
	}
	member, what, _ := strings.Cut(rest, "|")
	if what != "revoked" || !validNotifyID(member) {
		s.m.RelayRejected.WithLabelValues("malformed").Inc()
		return
	}
	s.checkRevocation(member)
}

// checkRevocation hands a revocation notice to the checker, which closes
// sessions only once the database confirms it (members.Revocations).
// Members with no session here are ignored: nothing to close, and a flood
// of notices for invented ids costs no query.
func (s *Server) checkRevocation(member string) {
	if s.loops.Context().Err() != nil || !s.engine.HasLocal(member) {
		return
	}
	s.revoking.Notice(member)
}

func validNotifyID(s string) bool { return s != "" && protocol.CheckText(s, protocol.MaxIDLen) == nil }

// closeMember closes every local session of a revoked member.
func (s *Server) closeMember(memberID, why string) {
	for _, ss := range s.localSessions() {
		if ss.authed.Load() && ss.memberID == memberID {
			ss.log().Info("closing session of revoked member", "why", why)
			ss.closeAfterFlush(websocket.StatusPolicyViolation, protocol.CloseReasonRevoked)
		}
	}
}

// checkRevoked closes sessions whose member was revoked, in case the
// notification was missed.
func (s *Server) checkRevoked(ctx context.Context) {
	ids := map[string]struct{}{}
	for _, ss := range s.localSessions() {
		if ss.authed.Load() {
			ids[ss.memberID] = struct{}{}
		}
	}
	list := make([]string, 0, len(ids))
	for id := range ids {
		list = append(list, id)
	}
	s.revoking.Check(ctx, list)
}
