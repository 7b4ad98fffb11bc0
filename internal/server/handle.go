package server

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// handleFrame dispatches one text frame, strictly in arrival order.
func (ss *session) handleFrame(data []byte) {
	env, send, err := protocol.DecodeFrame(data)
	if !ss.authed.Load() {
		if err == nil && env.Type != protocol.TypeHello {
			ss.sendError(protocol.CodeNoHello, "send a hello first", env.ReqID)
			return
		}
		ss.handleHello(data)
		return
	}
	if err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), env.ReqID)
		return
	}
	switch env.Type {
	case protocol.TypeSend:
		ss.handleSend(data, env.ReqID, send)
	case protocol.TypeClientAck:
		ss.handleClientAck(data, env.ReqID)
	case protocol.TypeSetStatus:
		ss.handleSetStatus(data, env.ReqID)
	case protocol.TypeSetSummary:
		ss.handleSetSummary(data, env.ReqID)
	case protocol.TypeJoinGroup, protocol.TypeLeaveGroup:
		ss.handleGroup(data, env.Type, env.ReqID)
	case protocol.TypeListPeers:
		ss.handleListPeers(env.ReqID)
	case protocol.TypeMessageStatus:
		ss.handleMessageStatus(data, env.ReqID)
	case protocol.TypeListMembers:
		ss.handleListMembers(data, env.ReqID)
	case protocol.TypePing:
		ss.queue(protocol.Pong{Type: protocol.TypePong, ReqID: env.ReqID})
	case protocol.TypeHello:
		ss.sendError(protocol.CodeMalformed, "already authenticated", env.ReqID)
	default:
		ss.sendError(protocol.CodeUnknownType, "unknown frame type "+strconv.Quote(truncateString(env.Type, 64)), env.ReqID)
	}
}

func truncateString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// handleHello runs the handshake checks in protocol order.
func (ss *session) handleHello(data []byte) {
	s := ss.s
	if s.draining.Load() {
		ss.reject(protocol.ReasonDraining, "")
		return
	}
	// Per-address limit before any cryptography, so a flood of bad hellos
	// cannot burn the CPU.
	if !s.helloRate.Allow(ss.addrKey) {
		ss.reject(protocol.ReasonRateLimited, "hello rate")
		return
	}
	h, err := protocol.DecodeHello(data)
	if err != nil {
		ss.reject(protocol.ReasonMalformed, err.Error())
		return
	}
	ss.claim(h.MeshID, h.Pubkey)
	if reason := auth.VerifyHello(h, s.now()); reason != "" {
		ss.reject(reason, "")
		return
	}
	ctx, cancel := context.WithTimeout(ss.ctx, 10*time.Second)
	defer cancel()
	pubkey := protocol.LowerHex(h.Pubkey)
	check := store.HelloCheck{SigHash: auth.SignatureHash(h.Signature), PID: h.PID, Cwd: h.Cwd, MeshID: h.MeshID, Pubkey: pubkey}
	if h.HasCapability(protocol.CapSendOnly) {
		// A hook that came before its session is for that session, not
		// for a command run in the same folder: hooks always name a cwd,
		// so an empty one takes none.
		check.PID, check.Cwd = 0, ""
	}
	// A member the node has not cached is looked up in the statement that
	// records the hello, which it does only for a live member under the
	// memberId the hello names: one round trip, not two. Such a hello is
	// recorded before the capacity check below; refused there, its
	// signature is spent, as a replayed one would be.
	var res store.HelloResult
	var recorded bool
	member, _, err := s.members.Lookup(ctx, h.MeshID, pubkey, func(ctx context.Context, all bool) ([]store.Member, error) {
		ms, rec, r, err := s.hellos.AcceptMember(ctx, all, h.MemberID, check)
		recorded, res = rec, r
		return ms, err
	})
	if errors.Is(err, store.ErrNotFound) {
		ss.reject(protocol.ReasonUnauthorized, "not a member")
		return
	}
	if err != nil {
		ss.reject(protocol.ReasonUnavailable, err.Error())
		return
	}
	if member.ID != h.MemberID {
		ss.reject(protocol.ReasonUnauthorized, "memberId does not match pubkey")
		return
	}
	prev, hasPrev := s.replica.FindSession(h.MeshID, member.ID, h.SessionID)
	meshCapped := !h.HasCapability(protocol.CapEphemeral) && !h.HasCapability(protocol.CapSendOnly)
	release, detail, ok := s.slots.Reserve(h.MeshID, member.ID, meshCapped, hasPrev, hasPrev && prev.Visible())
	if !ok {
		ss.reject(protocol.ReasonCapacity, detail)
		return
	}
	defer release() // for the failures; register releases once the presence exists
	if !recorded {
		res, err = s.hellos.Accept(ctx, check)
	}
	if err != nil {
		if store.IsDataError(err) {
			// Edge validation should have caught what Postgres refuses.
			s.m.BatchRowsFailed.WithLabelValues("hello").Inc()
			s.logger.Warn("row refused by Postgres; the rest of its batch was written", "batch", "hello", "err", err)
			ss.reject(protocol.ReasonMalformed, "refused by Postgres")
			return
		}
		ss.reject(protocol.ReasonUnavailable, err.Error())
		return
	}
	if !res.Fresh {
		ss.reject(protocol.ReasonReplayed, "")
		return
	}
	ss.register(h, member, prev, hasPrev, res.Pending, release)
}

// register makes the session live: it creates (or takes over) the presence
// entry, acks the hello and starts delivery.
func (ss *session) register(h *protocol.Hello, member store.Member, prev presence.Entry, hasPrev bool, pending string, release func()) {
	if !ss.helloDecided.CompareAndSwap(false, true) {
		return // timed out meanwhile
	}
	s := ss.s
	now := s.now()
	ss.meshID = h.MeshID
	ss.memberID, ss.displayName, ss.sessionID, ss.pubkey = member.ID, member.DisplayName, h.SessionID, member.Pubkey
	ss.clientAck = h.HasCapability(protocol.CapClientAck)
	ss.sysEvents = h.HasCapability(protocol.CapSystemEvents)
	ss.sendOnly = h.HasCapability(protocol.CapSendOnly)
	ephemeral := h.HasCapability(protocol.CapEphemeral) || ss.sendOnly

	groups := h.GroupNames()
	e := presence.Entry{
		PresenceID: store.NewID(), ConnID: ss.id,
		MeshID: h.MeshID, MemberID: member.ID, Pubkey: member.Pubkey, DisplayName: member.DisplayName,
		SessionID: h.SessionID, PID: h.PID, Cwd: h.Cwd, Hostname: h.Hostname,
		Status: protocol.StatusIdle, StatusSource: protocol.SourceJSONL, StatusUpdatedAt: now.UnixMilli(),
		ConnectedAt: now.UnixMilli(), Groups: groups, Ephemeral: ephemeral, SendOnly: ss.sendOnly,
	}
	reattached := hasPrev
	if hasPrev {
		// Same session reconnecting (or replacing itself): keep the presence.
		e.PresenceID = prev.PresenceID
		e.Status, e.StatusSource, e.StatusUpdatedAt = prev.Status, prev.StatusSource, prev.StatusUpdatedAt
		e.Summary = prev.Summary
		if !h.GroupsSet {
			// The client did not say: keep the groups it had.
			e.Groups = slices.Clone(prev.Groups)
		}
	}
	if pending != "" {
		presence.ApplyStatus(&e, pending, protocol.SourceHook, now, s.cfg.HookFresh())
	}
	ss.presenceID = e.PresenceID
	ss.maxPrio.Store(int32(protocol.MaxPriorityRank(e.Status)))
	// Set before the session is published below: other goroutines (a
	// revocation, the delivery engine) log through it from then on.

	s.mu.Lock()
	old := s.byPresence[e.PresenceID]
	s.byPresence[e.PresenceID] = ss
	addToSet(s.byMesh, ss.meshID, ss)
	s.mu.Unlock()
	ss.authed.Store(true)
	s.perAddr.Authed(ss.addrKey)
	s.m.ConnectionsActive.Inc()

	entry := s.replica.Create(e)
	release() // the presence counts for the caps from now on
	if old != nil && old != ss {
		old.replaced()
	}
	// The session listens for system events from before its hello_ack
	// is queued (a change the client makes once it has the ack must
	// reach it), and none is queued before the ack: systemEvent queues
	// under evMu too.
	ss.evMu.Lock()
	if ss.sysEvents && !ss.sendOnly {
		s.mu.Lock()
		addToSet(s.listeners, ss.meshID, ss)
		s.mu.Unlock()
	}
	ss.queue(protocol.HelloAck{Type: protocol.TypeHelloAck, ReqID: h.ReqID, PresenceID: entry.PresenceID,
		MemberDisplayName: member.DisplayName, Node: s.node, Reattached: reattached})
	ss.evMu.Unlock()
	s.engine.Attach(ss, replacedConn(prev, hasPrev)...) // a send-only session is never a delivery target

	ss.log().Info("ws hello", "member", member.DisplayName, "session_id", h.SessionID,
		"reattached", reattached, "client_ack", ss.clientAck)
	s.audit.Add(store.AuditEvent{MeshID: h.MeshID, Type: store.EventPeerConnected, Actor: member.ID,
		Target: entry.PresenceID, Metadata: map[string]any{"session_id": h.SessionID, "node": s.node,
			"reattached": reattached, "remote": ss.remote}})
}

// replaced closes a session whose presence was taken over by a newer
// connection of the same session.
func (ss *session) replaced() {
	ss.log().Info("session replaced")
	ss.closeAfterFlush(websocket.StatusNormalClosure, protocol.CloseReasonReplaced)
}

func (ss *session) handleClientAck(data []byte, reqID string) {
	var a protocol.ClientAck
	if err := protocol.Decode(data, &a); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	id, err := strconv.ParseInt(a.BrokerMessageID, 10, 64)
	if err != nil || id <= 0 {
		ss.sendError(protocol.CodeMalformed, "brokerMessageId is not a message id", reqID)
		return
	}
	// Only this member's own delivery row can be acknowledged: the key
	// carries the session's member id. The mark is queued before the push
	// is forgotten: a claim in between must find the row in one set or the
	// other, never in neither.
	ss.s.engine.Delivered(ss.meshID, delivery.Key{MessageID: id, MemberID: ss.memberID})
	ss.Unreserve(id)
}

func (ss *session) handleSetStatus(data []byte, reqID string) {
	var m protocol.SetStatus
	if err := protocol.Decode(data, &m); err != nil || !protocol.ValidStatus(m.Status) {
		ss.sendError(protocol.CodeMalformed, "status must be idle, working or dnd", reqID)
		return
	}
	source := protocol.SourceManual
	if m.Source == protocol.SourceJSONL {
		source = protocol.SourceJSONL
	} else if m.Source != "" && m.Source != protocol.SourceManual {
		ss.sendError(protocol.CodeMalformed, "source must be manual or jsonl", reqID)
		return
	}
	ss.log().Info("ws set_status", "status", m.Status, "source", source)
	ss.s.setStatus(ss.presenceID, m.Status, source)
}

func (ss *session) handleSetSummary(data []byte, reqID string) {
	var m protocol.SetSummary
	if err := protocol.Decode(data, &m); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	if len(m.Summary) > protocol.MaxSummaryLen {
		ss.sendError(protocol.CodeTooLarge, "summary longer than 512 bytes", reqID)
		return
	}
	ss.s.replica.Update(ss.presenceID, func(e *presence.Entry) bool {
		if e.Summary == m.Summary {
			return false
		}
		e.Summary = m.Summary
		return true
	})
}

func (ss *session) handleGroup(data []byte, typ, reqID string) {
	var m protocol.GroupOp
	if err := protocol.Decode(data, &m); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	if err := protocol.ValidateGroupName(m.Name); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	var tooMany bool
	ss.s.replica.Update(ss.presenceID, func(e *presence.Entry) bool {
		if typ == protocol.TypeJoinGroup {
			changed, full := e.JoinGroup(m.Name)
			tooMany = full
			return changed
		}
		return e.LeaveGroup(m.Name)
	})
	if tooMany {
		ss.sendError(protocol.CodeTooLarge, "a session may be in at most 64 groups", reqID)
	}
}

// handleListPeers answers list_peers within the session's rate (a request
// over it waits) and in at most 1 MiB (peers.go).
func (ss *session) handleListPeers(reqID string) {
	if !ss.allowListPeers() {
		return // the session is closing
	}
	ss.queueRaw(frame{data: ss.peersListReply(reqID)})
}

func (ss *session) handleMessageStatus(data []byte, reqID string) {
	var m protocol.MessageStatus
	if err := protocol.Decode(data, &m); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	res := protocol.MessageStatusResult{Type: protocol.TypeMessageStatusR, ReqID: reqID, MessageID: m.MessageID,
		Recipients: []protocol.RecipientState{}}
	if !ss.allowMessageStatus() {
		res.Error = protocol.CodeRateLimited
		ss.queue(res)
		return
	}
	id, err := strconv.ParseInt(m.MessageID, 10, 64)
	if err != nil || id <= 0 {
		res.Error = protocol.CodeNotFound
		ss.queue(res)
		return
	}
	ctx, cancel := context.WithTimeout(ss.ctx, 5*time.Second)
	defer cancel()
	info, err := ss.s.store.MessageStatus(ctx, ss.meshID, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		res.Error = protocol.CodeNotFound
	case err != nil:
		res.Error = protocol.CodeUnavailable
	default:
		var found bool
		res.Recipients, found = info.States(ss.memberID, ss.s.replica.MemberEntries)
		if !found {
			res.Error = protocol.CodeNotFound
		}
	}
	ss.queue(res)
}
