package client

import (
	"errors"
	"sync"
	"time"
)

// OutboxEntry is one sealed send waiting for the broker's ack. Its
// ClientMessageID is the send's idempotency key: resending an entry that the
// broker already committed returns the first messageId and delivers nothing
// twice, which is what lets an entry be retried after a crash or a lost ack.
type OutboxEntry struct {
	ClientMessageID string    `json:"clientMessageId"`
	TargetSpec      string    `json:"targetSpec"`
	Priority        string    `json:"priority"`
	Nonce           string    `json:"nonce"`
	Ciphertext      string    `json:"ciphertext"`
	To              string    `json:"to,omitempty"`   // what the user addressed, for display
	Text            string    `json:"text,omitempty"` // the plaintext, for the sender's own listing
	CreatedAt       time.Time `json:"createdAt"`
}

// Outbox keeps sends until the broker acks them. Implementations must make
// Add durable before returning; several processes may share one outbox, so
// Done and Fail must tolerate an entry that is already gone.
type Outbox interface {
	// Add stores an entry.
	Add(e OutboxEntry) error
	// Pending lists the entries not yet acked, oldest first.
	Pending() ([]OutboxEntry, error)
	// Done removes an entry the broker accepted.
	Done(clientMessageID string) error
	// Fail removes an entry the broker rejected for good, recording why.
	Fail(clientMessageID, code string) error
}

// Inbox records received messages. Record reports whether the message is
// new: a redelivered push (same messageId) is recorded once. Record must be
// durable before returning, because the push is acknowledged right after.
type Inbox interface {
	Record(m Message) (isNew bool, err error)
}

// ErrOutboxFull is returned by Add when the outbox holds too many entries.
var ErrOutboxFull = errors.New("outbox is full: the broker has not acked earlier messages (is it reachable?)")

// memOutbox is the in-memory Outbox used when Options.Outbox is nil.
type memOutbox struct {
	mu      sync.Mutex
	entries []OutboxEntry
	failed  map[string]string
}

// maxMemOutbox bounds the in-memory outbox.
const maxMemOutbox = 10000

// NewMemoryOutbox returns an Outbox that lives as long as the process.
func NewMemoryOutbox() Outbox { return &memOutbox{failed: map[string]string{}} }

func (o *memOutbox) Add(e OutboxEntry) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.entries) >= maxMemOutbox {
		return ErrOutboxFull
	}
	o.entries = append(o.entries, e)
	return nil
}

func (o *memOutbox) Pending() ([]OutboxEntry, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]OutboxEntry(nil), o.entries...), nil
}

func (o *memOutbox) remove(id string) bool {
	for i, e := range o.entries {
		if e.ClientMessageID == id {
			o.entries = append(o.entries[:i], o.entries[i+1:]...)
			return true
		}
	}
	return false
}

func (o *memOutbox) Done(id string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.remove(id)
	return nil
}

func (o *memOutbox) Fail(id, code string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.remove(id) {
		o.failed[id] = code
	}
	return nil
}

// memInbox dedupes by messageId in memory, remembering the most recent ids.
type memInbox struct {
	mu    sync.Mutex
	seen  map[string]struct{}
	order []string
}

// maxMemInbox bounds the ids an in-memory inbox remembers. Redeliveries come
// within a lease period, so a window of recent ids suffices.
const maxMemInbox = 10000

// NewMemoryInbox returns an Inbox that only dedupes, in memory.
func NewMemoryInbox() Inbox { return &memInbox{seen: map[string]struct{}{}} }

func (in *memInbox) Record(m Message) (bool, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if _, ok := in.seen[m.ID]; ok {
		return false, nil
	}
	if len(in.order) >= maxMemInbox {
		delete(in.seen, in.order[0])
		in.order = in.order[1:]
	}
	in.seen[m.ID] = struct{}{}
	in.order = append(in.order, m.ID)
	return true, nil
}
