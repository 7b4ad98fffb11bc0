// Package presence keeps the cluster-wide replica of who is online: one
// entry per live session, owned and written only by the node that hosts the
// socket, replicated to every node with memberlist (direct deltas plus
// push-pull anti-entropy), and the status rules the owner applies.
package presence

import (
	"slices"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
)

// State of an entry.
type State uint8

// Entry states. A Grace entry's socket dropped (or its node died); the
// session may reattach until GraceUntil. Gone is a tombstone.
const (
	Live State = iota
	Grace
	Gone
)

func (s State) String() string {
	switch s {
	case Live:
		return "live"
	case Grace:
		return "grace"
	}
	return "gone"
}

// Entry is one session's presence. Field tags are short, and empty fields
// left out, because entries travel in gossip packets.
type Entry struct {
	PresenceID string `json:"id"`
	Owner      string `json:"o"`  // node name hosting the socket
	OwnerInc   int64  `json:"oi"` // that node's incarnation
	// Epoch orders takeovers: a reattached session's entry has an epoch
	// above every version its new owner had seen, so it beats any late
	// update from the previous owner. Version orders changes within an
	// epoch. Both come from the owner's Lamport clock.
	Epoch   uint64 `json:"e"`
	Version uint64 `json:"v"`
	ConnID  string `json:"c,omitempty"` // the connection; leases carry it

	MeshID      string `json:"m"`
	MemberID    string `json:"mb"`
	Pubkey      string `json:"pk,omitempty"`
	DisplayName string `json:"dn,omitempty"`
	SessionID   string `json:"s,omitempty"`
	PID         int64  `json:"pid,omitempty"`
	Cwd         string `json:"cwd,omitempty"`
	Hostname    string `json:"h,omitempty"`

	Status          string   `json:"st,omitempty"`
	StatusSource    string   `json:"ss,omitempty"`
	StatusUpdatedAt int64    `json:"su,omitempty"` // unix ms
	Summary         string   `json:"sm,omitempty"`
	Groups          []string `json:"g,omitempty"`
	ConnectedAt     int64    `json:"ca,omitempty"` // unix ms

	// Ephemeral sessions (CLI commands) are hidden from peers.
	Ephemeral bool `json:"eph,omitempty"`
	// SendOnly sessions (capability send_only) are never handed a message:
	// no node may lease a row to one or count it as a place to deliver.
	SendOnly bool `json:"so,omitempty"`

	State      State `json:"x"`
	GraceUntil int64 `json:"gu,omitempty"` // unix ms

	// orphaned is local-only: the owner node is dead, so the entry is in
	// grace here whatever its State says.
	orphaned bool
	// orphanUntil is when a local orphan expires.
	orphanUntil int64
}

// newer reports whether a is ordered after b.
func (a *Entry) newer(b *Entry) bool {
	if a.Epoch != b.Epoch {
		return a.Epoch > b.Epoch
	}
	return a.Version > b.Version
}

// IsLive reports whether the session is connected (not in grace, not gone,
// owner alive).
func (e *Entry) IsLive() bool { return e.State == Live && !e.orphaned }

// Visible reports whether peers see the session: live and not ephemeral.
func (e *Entry) Visible() bool { return e.IsLive() && !e.Ephemeral }

// Receives reports whether the session may be handed messages: present
// and not send-only. Delivery decisions (fast paths, "is the member here or
// elsewhere", "held") look only at such entries.
func (e *Entry) Receives() bool { return e.Present() && !e.SendOnly }

// InGrace reports whether the entry waits for a reattach.
func (e *Entry) InGrace() bool { return e.State == Grace || (e.State == Live && e.orphaned) }

// Present reports whether the entry counts as present (live or in grace).
func (e *Entry) Present() bool { return e.State != Gone }

// MaxPriority is the least urgent priority rank the session accepts now.
func (e *Entry) MaxPriority() int { return protocol.MaxPriorityRank(e.Status) }

// HasGroup reports whether the session is in group name.
func (e *Entry) HasGroup(name string) bool {
	for _, g := range e.Groups {
		if g == name {
			return true
		}
	}
	return false
}

// JoinGroup adds the session to group name; changed is false when it was
// in it already, or full when it is in protocol.MaxGroups already. Groups
// is copied, not changed in place: other copies of the entry share it.
func (e *Entry) JoinGroup(name string) (changed, full bool) {
	if e.HasGroup(name) {
		return false, false
	}
	if len(e.Groups) >= protocol.MaxGroups {
		return false, true
	}
	e.Groups = append(slices.Clone(e.Groups), name)
	return true, false
}

// LeaveGroup takes the session out of group name (copying Groups, as
// JoinGroup does); false when it was not in it.
func (e *Entry) LeaveGroup(name string) bool {
	if !e.HasGroup(name) {
		return false
	}
	e.Groups = slices.DeleteFunc(slices.Clone(e.Groups), func(g string) bool { return g == name })
	return true
}

// Peer renders the entry for peers_list.
func (e *Entry) Peer() protocol.Peer {
	groups := e.Groups
	if groups == nil {
		groups = []string{}
	}
	return protocol.Peer{
		Pubkey: e.Pubkey, MemberID: e.MemberID, DisplayName: e.DisplayName, SessionID: e.SessionID,
		PresenceID: e.PresenceID, Status: e.Status, StatusSource: e.StatusSource, Summary: e.Summary,
		Groups: groups, Cwd: e.Cwd, Hostname: e.Hostname,
		ConnectedAt: protocol.FormatTime(time.UnixMilli(e.ConnectedAt)), Node: e.Owner,
	}
}

// Event renders the entry as a system event's eventData.
func (e *Entry) Event() protocol.PeerEvent {
	return protocol.PeerEvent{
		Pubkey: e.Pubkey, MemberID: e.MemberID, DisplayName: e.DisplayName, SessionID: e.SessionID,
		PresenceID: e.PresenceID, Status: e.Status, StatusSource: e.StatusSource, Summary: e.Summary, Node: e.Owner,
	}
}

// SystemPush renders the push frame announcing event (peer_joined,
// peer_left, peer_status) about the entry to its mesh, made at at.
func (e *Entry) SystemPush(event string, at time.Time) []byte {
	data, _ := Marshal(e.Event())
	frame, _ := Marshal(protocol.Push{
		Type: protocol.TypePush, Subtype: protocol.SubtypeSystem, Event: event, MeshID: e.MeshID,
		SenderPubkey: protocol.SystemSender, Ciphertext: "", EventData: data,
		CreatedAt: protocol.FormatTime(at),
	})
	return frame
}

func sourceRank(s string) int {
	switch s {
	case protocol.SourceHook:
		return 3
	case protocol.SourceManual:
		return 2
	}
	return 1
}

// ApplyStatus applies a status report to e following the seed's rules and
// reports whether the status or its source changed (the timestamp is
// refreshed either way, except for a hook against dnd):
//
//   - a hook cannot change dnd (dnd is sacred);
//   - a changed status always wins and records its source;
//   - an unchanged status from a source of equal or higher rank
//     (hook > manual > jsonl) upgrades the source;
//   - from a lower rank it only refreshes the timestamp while the recorded
//     source is fresh (within fresh), otherwise it downgrades the source.
func ApplyStatus(e *Entry, status, source string, now time.Time, fresh time.Duration) bool {
	if source == protocol.SourceHook && e.Status == protocol.StatusDND {
		return false
	}
	ms := now.UnixMilli()
	prevStatus, prevSource := e.Status, e.StatusSource
	switch {
	case e.Status != status:
		e.Status, e.StatusSource = status, source
	case sourceRank(source) >= sourceRank(e.StatusSource):
		e.StatusSource = source
	default:
		age := ms - e.StatusUpdatedAt
		if age < 0 || age > fresh.Milliseconds() {
			e.StatusSource = source
		}
	}
	e.StatusUpdatedAt = ms
	return e.Status != prevStatus || e.StatusSource != prevSource
}

// truncate shortens s to at most n bytes without splitting a UTF-8
// sequence.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && n < len(s) && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}
