package protocol

// Extensions for clients that address members by name whether they are
// online or not (list_members), and for short-lived connections that must
// never be handed a message (capability send_only). Both are opt-in: a
// v0.1 client never sends them and so never sees their replies.

// Frame types of the member listing.
const (
	TypeListMembers = "list_members"
	TypeMembersList = "members_list"
)

// CapSendOnly makes a session send-only and invisible: it is never handed a
// message (no push, no lease, on any node), receives no system events, is
// not listed by list_peers, announces no join or leave, does not count
// toward the mesh's connection cap and is never the target of a hook. It
// still sends, lists and asks. A CLI command that only sends or lists uses
// it, so a message held for the member's working session is not taken by
// the command's connection.
const CapSendOnly = "send_only"

// Member listing bounds: a page is at most MaxMembersPage members of at
// most a few hundred bytes each, far below a client's frame limit.
const (
	DefaultMembersPage = 200
	MaxMembersPage     = 500
)

// ListMembers asks for the mesh's live (not revoked) members, online or
// not, ordered by member id, starting after the member id After.
type ListMembers struct {
	Type  string `json:"type"`
	ReqID string `json:"_reqId,omitempty"`
	After string `json:"after,omitempty"`
	Limit int    `json:"limit,omitempty"` // zero: DefaultMembersPage; capped at MaxMembersPage
}

// MemberInfo is one member in members_list.
type MemberInfo struct {
	MemberID    string `json:"memberId"`
	Pubkey      string `json:"pubkey"`
	DisplayName string `json:"displayName"`
	Role        string `json:"role"`
	JoinedAt    string `json:"joinedAt"`
	// Online: the member has a live, visible session somewhere in the
	// cluster (send-only and ephemeral connections do not count).
	Online bool `json:"online"`
}

// MembersList answers list_members. Next, when set, is the After of the
// following page.
type MembersList struct {
	Type    string       `json:"type"`
	ReqID   string       `json:"_reqId,omitempty"`
	Members []MemberInfo `json:"members"`
	Next    string       `json:"next,omitempty"`
}
