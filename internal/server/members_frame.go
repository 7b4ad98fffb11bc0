package server

import (
	"context"
	"time"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/members"
	"github.com/claudemesh/broker/internal/protocol"
)

// list_members is answered from the member cache. A page is bounded in
// members and each field in bytes (members.Page), and a session may ask a
// few times a second: a client paging through a large mesh is not slowed,
// one asking in a loop cannot make the node render member lists all day.
const (
	membersPerSec = 10
	membersBurst  = 20
)

// handleListMembers answers list_members with one page of the mesh's live
// members, online or not.
func (ss *session) handleListMembers(data []byte, reqID string) {
	var m protocol.ListMembers
	if err := protocol.Decode(data, &m); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	if err := protocol.CheckField("after", m.After, protocol.MaxIDLen); err != nil {
		ss.sendError(protocol.CodeMalformed, err.Error(), reqID)
		return
	}
	if m.Limit < 0 {
		ss.sendError(protocol.CodeMalformed, "limit must not be negative", reqID)
		return
	}
	if ss.membersLimit == nil {
		ss.membersLimit = rate.NewLimiter(membersPerSec, membersBurst)
	}
	if !ss.membersLimit.Allow() {
		ss.s.m.RequestsLimited.WithLabelValues(protocol.TypeListMembers).Inc()
		ss.sendError(protocol.CodeRateLimited, "list_members: at most 10 a second", reqID)
		return
	}
	limit := m.Limit
	if limit == 0 {
		limit = protocol.DefaultMembersPage
	}
	limit = min(limit, protocol.MaxMembersPage)
	ctx, cancel := context.WithTimeout(ss.ctx, 5*time.Second)
	defer cancel()
	all, err := ss.s.members.All(ctx, ss.meshID)
	if err != nil {
		ss.sendError(protocol.CodeUnavailable, "member list unavailable", reqID)
		return
	}
	res := members.Page(all, m.After, limit, ss.s.replica.MemberOnline)
	res.ReqID = reqID
	ss.queue(res)
}
