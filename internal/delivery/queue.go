package delivery

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
)

// Queue is the durable message queue the engine drives: messages with one
// delivery row per recipient member, leased to a connection while a push is
// in flight. Every method takes one params struct (river's
// riverdriver.Executor is the model), so a field added for one caller does
// not reshuffle the others. store.Store implements it on Postgres;
// deliverytest.Queue in memory, and deliverytest.RunQueueSuite holds both to
// the same rules.
//
// A Queue's errors say what failed through ErrRefused, ErrBadValue and
// ErrUnavailable (errors.Is); a batch of which only some rows failed is a
// *RowsError. Every method is safe for concurrent use by several nodes.
//
// Leases are fenced by node incarnation: a row leased to a session of
// node incarnation N is claimed (Claim), marked (MarkDelivered with Node
// set) and released (ReleaseLeases, by connection) only by N while the
// lease lasts, so a lease taken over (TakeOver) by another incarnation
// leaves the old one nothing it can push from a claim, mark or give back.
type Queue interface {
	// InsertMessages commits a batch of messages and their delivery rows in
	// one transaction, with its notifications, which go out only if it
	// commits. Message ids follow batch order. Messages refused alone fail
	// alone (Inserted.Err); an error means nothing was committed.
	InsertMessages(ctx context.Context, p *InsertParams) ([]Inserted, error)
	// Claim leases deliverable rows for many members at once. Concurrent
	// claimers get disjoint rows. A row is deliverable when it is neither
	// delivered nor expired, its priority is at most the request's, and its
	// lease has run out (by the queue's clock) or is a remote fast-path
	// lease to the claiming node that nobody has pushed (attempts 0). Rows
	// come back by recipient, then message id.
	Claim(ctx context.Context, p *ClaimParams) ([]Delivery, error)
	// TakeOver is Claim for members whose session (re)attached to the
	// claiming node: besides the deliverable rows, it leases the rows held
	// under a live lease by a node incarnation other than p.Node that is
	// not in p.Keep (a node not confirmed alive and answering), and those
	// leased to p.Conns (connections the member's sessions gave up) on any
	// node but p.Node. Rows come back as Claim's do; a taken row's lease
	// names p.Node from then on, which fences the old holder out.
	TakeOver(ctx context.Context, p *TakeOverParams) ([]Delivery, error)
	// MarkDelivered marks rows delivered and returns those that were not
	// already. Keys refused alone make a *RowsError; the others are marked.
	MarkDelivered(ctx context.Context, p *MarkParams) ([]Key, error)
	// ReleaseLeases gives back undelivered rows leased to p.Conn, so another
	// session can claim them at once. It returns how many were released.
	ReleaseLeases(ctx context.Context, p *ReleaseParams) (int64, error)
	// ReleaseNodeLeases releases every live lease of node incarnations
	// matching p.Pattern (SQL LIKE) but p.Keep, and returns the members
	// whose rows became claimable.
	ReleaseNodeLeases(ctx context.Context, p *ReleaseNodeParams) ([]MemberRef, error)
	// ExpireDue marks up to p.Limit undelivered rows past their expiry.
	ExpireDue(ctx context.Context, p *ExpireParams) ([]Expired, error)
}

// Errors a Queue wraps its own in, so the engine can tell failures apart
// without knowing the database.
var (
	// ErrRefused: the queue refused the row's values; the same row fails
	// again, the other rows of its batch do not.
	ErrRefused = errors.New("delivery: row refused")
	// ErrBadValue (a kind of ErrRefused): the row's text or numbers are
	// unacceptable, as opposed to a constraint it broke.
	ErrBadValue = fmt.Errorf("%w: bad value", ErrRefused)
	// ErrUnavailable: the queue could not be reached; later may work.
	ErrUnavailable = errors.New("delivery: queue unavailable")
)

// RowsError is a batch write of which some rows were not written while the
// others were. Check for it before ErrUnavailable.
type RowsError struct {
	// Errs holds, per row of the batch, why it was not written (nil: it was).
	Errs []error
}

func (e *RowsError) Error() string {
	n, first := 0, error(nil)
	for _, err := range e.Errs {
		if err != nil {
			if n++; first == nil {
				first = err
			}
		}
	}
	return fmt.Sprintf("%d of %d rows not written: %v", n, len(e.Errs), first)
}

// Refused counts the rows refused on their own (ErrRefused).
func (e *RowsError) Refused() int {
	n := 0
	for _, err := range e.Errs {
		if errors.Is(err, ErrRefused) {
			n++
		}
	}
	return n
}

// Key names one delivery row.
type Key struct {
	MessageID int64
	MemberID  string
}

// NewMessage is a send to commit: the envelope and its recipient members
// (already expanded from the target spec).
type NewMessage struct {
	MeshID          string
	SenderMemberID  string
	SenderPubkey    string
	SenderName      string
	TargetSpec      string
	Priority        int16
	Nonce           string
	Ciphertext      string
	ClientMessageID string // empty: no idempotency key
	Recipients      []NewRecipient
}

// NewRecipient is one delivery row to write. A non-empty LeaseConn writes
// the row already leased to that connection: on this node (the local fast
// path, pushed right after the commit, attempts 1), or, with LeaseNode set,
// on that node incarnation (the remote fast path: the row travels in an
// envelope notification; attempts 0 lets any claim of that node take the
// row while nobody has pushed it).
type NewRecipient struct {
	MemberID  string
	LeaseConn string
	LeaseNode string // remote fast path: the lease's node incarnation
}

// EnvelopeNotify is the envelope notification of message Ord (index into
// the batch), which the queue completes and seals as the row commits.
type EnvelopeNotify struct {
	Ord int
	relay.Pending
}

// InsertParams is one group commit.
type InsertParams struct {
	Messages []NewMessage
	TTL      time.Duration // messages expire this long after their commit
	// LeaseNode and Lease apply to local fast-path rows (LeaseConn set,
	// LeaseNode empty) and to remote ones for their duration.
	LeaseNode string
	Lease     time.Duration
	// WakeChannels and WakePayloads are wake-up notifications (parallel),
	// sent after the batch's envelopes.
	WakeChannels, WakePayloads []string
	Envelopes                  []EnvelopeNotify
}

// Inserted is the outcome of one NewMessage.
type Inserted struct {
	ID        int64
	CreatedAt time.Time
	// Duplicate means the sender already sent this client_message_id: ID is
	// the first message's id and nothing new was queued.
	Duplicate bool
	// Err is why this message alone was not committed (ErrRefused, or
	// ErrUnavailable while the batch was split to find refused rows).
	Err error
}

// ClaimRequest asks for up to Limit deliverable rows of MemberID, leased to
// Conn, with priority rank at most MaxPriority.
type ClaimRequest struct {
	MemberID    string
	Conn        string
	MaxPriority int16
	Limit       int32
}

// ClaimParams is one claim round.
type ClaimParams struct {
	Node     string // the claiming node incarnation (name#incarnation)
	Lease    time.Duration
	Requests []ClaimRequest
}

// Delivery is a claimed row with its envelope.
type Delivery struct {
	MessageID int64
	MemberID  string // recipient
	Conn      string
	Attempts  int32
	// PrevConn is the connection that held the row's lease before this
	// claim: a row leased by the remote fast path may already have been
	// pushed to it.
	PrevConn        string
	MeshID          string
	SenderMemberID  string
	SenderPubkey    string
	SenderName      string
	TargetSpec      string
	Priority        int16
	Nonce           string
	Ciphertext      string
	ClientMessageID string
	CreatedAt       time.Time
}

// Key is the row's key.
func (d *Delivery) Key() Key { return Key{MessageID: d.MessageID, MemberID: d.MemberID} }

// Frame renders the row as the push frame its recipient is sent.
func (d *Delivery) Frame() []byte {
	fields := protocol.PushFields{
		MessageID: d.MessageID, MeshID: d.MeshID, SenderPubkey: d.SenderPubkey,
		Priority: protocol.PriorityName(int(d.Priority)), Nonce: d.Nonce, Ciphertext: d.Ciphertext,
		CreatedAt: d.CreatedAt, SenderMemberID: d.SenderMemberID, SenderName: d.SenderName,
		TargetSpec: d.TargetSpec, ClientMessageID: d.ClientMessageID,
	}
	return protocol.AppendPush(make([]byte, 0, 400+len(d.Nonce)+len(d.Ciphertext)+len(d.SenderName)), &fields)
}

// MarkParams marks rows delivered.
type MarkParams struct {
	Keys []Key
	// Node, when set, is the marking node incarnation: a row under a live
	// lease of another incarnation (taken over) is not marked.
	Node string
}

// TakeOverParams is one takeover round (Queue.TakeOver): a claim round
// that also takes the leases of the node incarnations not kept.
type TakeOverParams struct {
	ClaimParams
	// Keep names the node incarnations whose live leases stand: those
	// confirmed alive and answering the claiming node.
	Keep []string
	// Conns are connections whose live leases are taken whatever their
	// node (but p.Node): the sessions that reattached here replaced them.
	Conns []string
}

// ReleaseParams gives back rows leased to Conn.
type ReleaseParams struct {
	Conn string
	Keys []Key
}

// ReleaseNodeParams releases the leases of departed node incarnations.
type ReleaseNodeParams struct {
	Pattern string // SQL LIKE over lease node names (EscapeLike the literal parts)
	Keep    string // a lease node name to leave alone ("" for none)
}

// MemberRef names a member and its mesh.
type MemberRef struct {
	MeshID   string
	MemberID string
}

// ExpireParams bounds one expiry pass.
type ExpireParams struct {
	Limit int
}

// Expired is a delivery row that ran out of time undelivered.
type Expired struct {
	Key
	MeshID string
}

// EscapeLike escapes LIKE wildcards in s, for ReleaseNodeParams.Pattern.
func EscapeLike(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return r.Replace(s)
}
