package delivery

import (
	"time"

	"github.com/claudemesh/broker/internal/presence"
)

// Auditor records what happened to messages (audit.Writer). Its methods
// must not block.
type Auditor interface {
	MessageQueued(mesh, sender, target string, at time.Time, id int64, priority string, size, recipients int)
	MessagesDelivered(mesh, member string, ids []int64)
	MessageExpired(mesh, member string, id int64)
}

// Directory is what the engine reads of the cluster's presence replica
// (presence.Replica): where a member's sessions are.
type Directory interface {
	// MemberPresent reports whether the member has a session (live or in
	// grace) anywhere, and whether one is on another node.
	MemberPresent(member string) (present, remote bool)
	// SoleRemoteSession returns the member's only receiving session when it
	// is live on another node.
	SoleRemoteSession(member string) (presence.Entry, bool)
}

var _ Directory = (*presence.Replica)(nil)

// Notifier wakes other nodes after a commit (relay.Notifier).
type Notifier interface {
	Notify(meshID string, members []string)
}
