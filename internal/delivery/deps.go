package delivery

import (
	"time"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

// Auditor records what happened to messages (audit.Writer). Its methods
// must not block.
type Auditor interface {
	// MessagesQueued records one sender's messages committed by one
	// batch, in commit order.
	MessagesQueued(mesh, sender string, at time.Time, msgs []QueuedMessage)
	MessagesDelivered(mesh, member string, ids []int64)
	MessageExpired(mesh, member string, id int64)
}

// QueuedMessage is one committed send, as the audit log records it.
type QueuedMessage struct {
	ID         int64
	Target     string // the send's target spec
	Priority   string
	Size       int // nonce and ciphertext bytes
	Recipients int
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

// Recipient is a session the engine pushes rows to: the WebSocket front's
// session implements it. Its reads (IDs, MaxPriority, Room, Closing,
// Starved) are lock-free, so the engine may call them under its own lock;
// Reserve, Unreserve and Push take the session's lock, and the engine
// calls them only outside its own, so the two locks never nest.
type Recipient interface {
	ConnID() string // the connection id leases name
	MeshID() string
	MemberID() string
	// SendOnly sessions (capability send_only) are never a delivery
	// target: Attach ignores them.
	SendOnly() bool
	// MaxPriority is the least urgent priority rank its status lets
	// through now (working and dnd: only now).
	MaxPriority() int
	// Room is how many more envelope pushes its queue takes now.
	Room() int
	// Closing reports whether it is closing: it takes no more pushes.
	Closing() bool
	// Starved notes that a claim was skipped for want of room; the session
	// calls Engine.Kick once its writer has made room.
	Starved()
	// Reserve enters a row in its in-flight set (pushed or about to be,
	// not yet marked delivered).
	Reserve(messageID int64) Reservation
	// Unreserve takes a row out of the in-flight set.
	Unreserve(messageID int64)
	// Push queues the push of a reserved row; false when the queue has no
	// room for it (the reservation stays: the engine takes it out).
	Push(p *Push) bool
}

// Reservation is what Recipient.Reserve found.
type Reservation int

const (
	// Reserved: the row is now in flight to the session.
	Reserved Reservation = iota
	// AlreadyHeld: it was in flight to the session already (its lease was
	// released and claimed again): pushing twice would only make the
	// client drop a duplicate.
	AlreadyHeld
	// Gone: the session is closing; the row goes back to the queue.
	Gone
)

// Push is a row to write to a session.
type Push struct {
	Delivery
	// Committed is when its message committed, for the commit-to-push
	// latency (zero when unknown).
	Committed time.Time
	// After, when set, is closed once the sender's ack of the message is
	// written: the push goes on the wire after that ack (the original
	// broker's order), or after a short bound if the ack is held up.
	After <-chan struct{}
}

// Sender is the session a send came from (the WebSocket front's session).
type Sender interface {
	// Answer queues the send's ack (which frees its send slot once
	// written). The returned channel is closed once the ack is written, or
	// once it never will be.
	Answer(ack protocol.Ack) <-chan struct{}
	// Done is closed when the session ends.
	Done() <-chan struct{}
}
