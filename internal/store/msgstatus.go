package store

import (
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

// States is what viewer may see of the message's recipients for
// message_status: every row for its sender, only its own row for a
// recipient. sessions lists a member's presence entries cluster-wide.
// found is false when viewer is neither the sender nor a recipient.
func (info MessageInfo) States(viewer string, sessions func(memberID string) []presence.Entry) (states []protocol.RecipientState, found bool) {
	sender := info.SenderMemberID == viewer
	states = []protocol.RecipientState{}
	for _, r := range info.Recipients {
		if !sender && r.MemberID != viewer {
			continue // a recipient sees only its own row
		}
		states = append(states, protocol.RecipientState{
			MemberID: r.MemberID, DisplayName: r.DisplayName, State: r.State(info.Priority, sessions)})
	}
	return states, sender || len(states) > 0
}

// State names the row's state; "held" means the recipient is online (one
// of its sessions is live and receives) but none of those accepts the
// priority now. sessions is asked only for rows still to deliver.
func (r RecipientRow) State(priority int16, sessions func(memberID string) []presence.Entry) string {
	switch {
	case r.Delivered:
		return protocol.StateDelivered
	case r.Expired:
		return protocol.StateExpired
	case r.Leased:
		return protocol.StateLeased
	}
	entries := sessions(r.MemberID)
	live := false
	for i := range entries {
		if !entries[i].IsLive() || !entries[i].Receives() {
			continue
		}
		live = true
		if int(priority) <= entries[i].MaxPriority() {
			return protocol.StateQueued
		}
	}
	if live {
		return protocol.StateHeld
	}
	return protocol.StateQueued
}
