package server

import (
	"context"
	"sort"
	"time"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// list_members is answered from the member cache. A page is bounded in
// members and each field in bytes, and a session may ask a few times a
// second: a client paging through a large mesh is not slowed, one asking in
// a loop cannot make the node render member lists all day.
const (
	membersPerSec   = 10
	membersBurst    = 20
	maxMemberRole   = 16
	maxMemberIDsLen = protocol.MaxIDLen
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
	// The cache's list is shared: sort a copy of the ids that follow the
	// cursor, so pages stay stable while members join.
	page := make([]store.Member, 0, min(len(all), limit+1))
	for _, mem := range all {
		if mem.ID > m.After {
			page = append(page, mem)
		}
	}
	sort.Slice(page, func(i, j int) bool { return page[i].ID < page[j].ID })
	res := protocol.MembersList{Type: protocol.TypeMembersList, ReqID: reqID, Members: make([]protocol.MemberInfo, 0, min(len(page), limit))}
	for i, mem := range page {
		if i == limit {
			res.Next = page[i-1].ID
			break
		}
		res.Members = append(res.Members, protocol.MemberInfo{
			MemberID: clipBytes(mem.ID, maxMemberIDsLen), Pubkey: clipBytes(mem.Pubkey, 64),
			DisplayName: clipBytes(mem.DisplayName, protocol.MaxDisplayName), Role: clipBytes(mem.Role, maxMemberRole),
			JoinedAt: protocol.FormatTime(mem.JoinedAt), Online: ss.s.memberOnline(mem.ID),
		})
	}
	ss.queue(res)
}

// memberOnline reports whether a member has a visible live session on any
// node (send-only and ephemeral connections are not someone to talk to).
func (s *Server) memberOnline(memberID string) bool {
	for _, e := range s.replica.MemberEntries(memberID) {
		if e.Visible() {
			return true
		}
	}
	return false
}

// clipBytes bounds a stored string for the wire without splitting a UTF-8
// sequence (rows written before a limit existed may be longer).
func clipBytes(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}
