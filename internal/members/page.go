package members

import (
	"sort"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// maxRole bounds a member's role in a members_list.
const maxRole = 16

// Page is one page of a list_members answer: the members of all whose id
// follows after, in id order, at most limit of them (limit > 0), each
// field clipped to its wire bound, with Next set when more follow. online
// tells whether a member has a visible live session. all is not modified
// (the cache's list is shared): a copy of the ids past the cursor is
// sorted, so pages stay stable while members join.
func Page(all []store.Member, after string, limit int, online func(memberID string) bool) protocol.MembersList {
	page := make([]store.Member, 0, min(len(all), limit+1))
	for _, mem := range all {
		if mem.ID > after {
			page = append(page, mem)
		}
	}
	sort.Slice(page, func(i, j int) bool { return page[i].ID < page[j].ID })
	res := protocol.MembersList{Type: protocol.TypeMembersList, Members: make([]protocol.MemberInfo, 0, min(len(page), limit))}
	for i, mem := range page {
		if i == limit {
			res.Next = page[i-1].ID
			break
		}
		res.Members = append(res.Members, protocol.MemberInfo{
			MemberID: clipBytes(mem.ID, protocol.MaxIDLen), Pubkey: clipBytes(mem.Pubkey, 64),
			DisplayName: clipBytes(mem.DisplayName, protocol.MaxDisplayName), Role: clipBytes(mem.Role, maxRole),
			JoinedAt: protocol.FormatTime(mem.JoinedAt), Online: online(mem.ID),
		})
	}
	return res
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
