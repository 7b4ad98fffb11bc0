// Package deliverytest holds what the delivery engine's tests need without
// Postgres: Queue, an in-memory delivery.Queue that follows store's
// Postgres queue rule for rule, and RunQueueSuite, the conformance cases
// both must pass (river's riverdrivertest is the model).
package deliverytest

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
)

// Queue is an in-memory delivery.Queue. Its clock is the database's: Now
// stands in for Postgres' now(), and a test may move it.
type Queue struct {
	mu      sync.Mutex
	now     func() time.Time
	key     *relay.EnvelopeKey
	nextID  int64
	msgs    map[int64]*message
	rows    map[delivery.Key]*row
	byMem   map[string][]int64 // recipient → its message ids, ascending
	idem    map[[2]string]int64
	members map[string]string // member → mesh (the member table)
	subs    []func(channel, payload string)
	down    bool
	// claimHook, when set, runs before every Claim and TakeOver (outside
	// the lock); an error fails the call (SetClaimHook).
	claimHook func(ctx context.Context, p *delivery.ClaimParams) error
	// markHook, when set, runs before every MarkDelivered (SetMarkHook).
	markHook func(ctx context.Context, p *delivery.MarkParams) error
}

var _ delivery.Queue = (*Queue)(nil)

type message struct {
	delivery.NewMessage
	id        int64
	createdAt time.Time
	expiresAt time.Time
}

type row struct {
	msg          *message
	member       string
	leaseConn    string
	leaseNode    string
	leaseExpires time.Time // zero: no lease
	attempts     int32
	delivered    bool
	expired      bool
}

// NewQueue makes an empty queue whose clock is now (time.Now when nil)
// and which seals envelopes with key (unsealed when nil).
func NewQueue(now func() time.Time, key *relay.EnvelopeKey) *Queue {
	if now == nil {
		now = time.Now
	}
	return &Queue{now: now, key: key, msgs: map[int64]*message{}, rows: map[delivery.Key]*row{},
		byMem: map[string][]int64{}, idem: map[[2]string]int64{}, members: map[string]string{}}
}

// AddMember enters a member of a mesh (the member table ReleaseNodeLeases
// joins).
func (q *Queue) AddMember(mesh, member string) {
	q.mu.Lock()
	q.members[member] = mesh
	q.mu.Unlock()
}

// Subscribe calls fn with every notification the queue sends, after the
// commit that sends it and outside the queue's lock, as LISTEN would.
func (q *Queue) Subscribe(fn func(channel, payload string)) {
	q.mu.Lock()
	q.subs = append(q.subs, fn)
	q.mu.Unlock()
}

// SetDown makes every call fail as unavailable (an outage), or not.
func (q *Queue) SetDown(down bool) {
	q.mu.Lock()
	q.down = down
	q.mu.Unlock()
}

// SetClaimHook makes fn run before every Claim and TakeOver, with the
// call's context, outside the queue's lock; its error fails the call (a
// slow or failing claim). nil removes it.
func (q *Queue) SetClaimHook(fn func(ctx context.Context, p *delivery.ClaimParams) error) {
	q.mu.Lock()
	q.claimHook = fn
	q.mu.Unlock()
}

// SetMarkHook makes fn run before every MarkDelivered, with the call's
// context, outside the queue's lock; its error fails the call (a slow or
// failing mark). nil removes it.
func (q *Queue) SetMarkHook(fn func(ctx context.Context, p *delivery.MarkParams) error) {
	q.mu.Lock()
	q.markHook = fn
	q.mu.Unlock()
}

type note struct{ channel, payload string }

// unlockNotify releases the lock, then hands notes to the subscribers.
func (q *Queue) unlockNotify(notes []note) {
	subs := q.subs
	q.mu.Unlock()
	for _, n := range notes {
		for _, fn := range subs {
			fn(n.channel, n.payload)
		}
	}
}

var errDown = fmt.Errorf("deliverytest: queue down: %w", delivery.ErrUnavailable)

// storable is what Postgres refuses in text: NUL and invalid UTF-8.
func storable(ss ...string) error {
	for _, s := range ss {
		if err := protocol.CheckText(s, 0); err != nil {
			return fmt.Errorf("deliverytest: %w: %w", delivery.ErrBadValue, err)
		}
	}
	return nil
}

func checkMessage(m *delivery.NewMessage) error {
	if err := storable(m.MeshID, m.SenderMemberID, m.SenderPubkey, m.SenderName, m.TargetSpec, m.Nonce,
		m.Ciphertext, m.ClientMessageID); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, r := range m.Recipients {
		if err := storable(r.MemberID, r.LeaseConn, r.LeaseNode); err != nil {
			return err
		}
		if seen[r.MemberID] {
			// The delivery table's primary key.
			return fmt.Errorf("deliverytest: recipient %q twice: %w", r.MemberID, delivery.ErrRefused)
		}
		seen[r.MemberID] = true
	}
	return nil
}

// InsertMessages implements delivery.Queue.
func (q *Queue) InsertMessages(_ context.Context, p *delivery.InsertParams) ([]delivery.Inserted, error) {
	q.mu.Lock()
	if q.down {
		q.mu.Unlock()
		return nil, errDown
	}
	now := q.now().Truncate(time.Microsecond) // Postgres' precision
	out := make([]delivery.Inserted, len(p.Messages))
	envs := map[int][]delivery.EnvelopeNotify{}
	for _, e := range p.Envelopes {
		envs[e.Ord] = append(envs[e.Ord], e)
	}
	var notes []note
	for i := range p.Messages {
		m := &p.Messages[i]
		q.nextID++ // ids are taken by duplicates and refused rows too
		id := q.nextID
		if err := checkMessage(m); err != nil {
			out[i] = delivery.Inserted{Err: err}
			continue
		}
		if m.ClientMessageID != "" {
			k := [2]string{m.SenderMemberID, m.ClientMessageID}
			if first, dup := q.idem[k]; dup {
				out[i] = delivery.Inserted{ID: first, CreatedAt: q.msgs[first].createdAt, Duplicate: true}
				continue
			}
			q.idem[k] = id
		}
		msg := &message{NewMessage: *m, id: id, createdAt: now, expiresAt: now.Add(p.TTL)}
		msg.Recipients = nil
		q.msgs[id] = msg
		for _, r := range m.Recipients {
			rw := &row{msg: msg, member: r.MemberID}
			switch {
			case r.LeaseConn != "" && r.LeaseNode != "":
				rw.leaseConn, rw.leaseNode, rw.leaseExpires = r.LeaseConn, r.LeaseNode, now.Add(p.Lease)
			case r.LeaseConn != "":
				rw.leaseConn, rw.leaseNode, rw.leaseExpires, rw.attempts = r.LeaseConn, p.LeaseNode, now.Add(p.Lease), 1
			}
			q.rows[delivery.Key{MessageID: id, MemberID: r.MemberID}] = rw
			q.byMem[r.MemberID] = append(q.byMem[r.MemberID], id) // ids only grow
		}
		out[i] = delivery.Inserted{ID: id, CreatedAt: now}
		for _, e := range envs[i] {
			notes = append(notes, note{e.Channel, relay.CompleteEnvelope(e.Pending, id, now, q.key)})
		}
	}
	// Envelopes first, in batch order, then the wake-ups (as the statement).
	for i := range p.WakeChannels {
		notes = append(notes, note{p.WakeChannels[i], p.WakePayloads[i]})
	}
	q.unlockNotify(notes)
	return out, nil
}

// claimable is the claim statement's WHERE clause.
func (rw *row) claimable(now time.Time, node string, maxp int16) bool {
	return !rw.delivered && !rw.expired && rw.msg.Priority <= maxp && rw.msg.expiresAt.After(now) &&
		(rw.leaseExpires.IsZero() || rw.leaseExpires.Before(now) || (rw.leaseNode == node && rw.attempts == 0))
}

// takeable is the takeover statement's WHERE clause beyond claimable's:
// a live lease of another node incarnation that is not kept, or of a
// connection given up.
func (rw *row) takeable(now time.Time, node string, maxp int16, keep, conns map[string]bool) bool {
	if rw.claimable(now, node, maxp) {
		return true
	}
	return !rw.delivered && !rw.expired && rw.msg.Priority <= maxp && rw.msg.expiresAt.After(now) &&
		rw.leaseExpires.After(now) && rw.leaseNode != node && (!keep[rw.leaseNode] || conns[rw.leaseConn])
}

// Claim implements delivery.Queue.
func (q *Queue) Claim(ctx context.Context, p *delivery.ClaimParams) ([]delivery.Delivery, error) {
	return q.claim(ctx, p, func(rw *row, r delivery.ClaimRequest, now time.Time) bool {
		return rw.claimable(now, p.Node, r.MaxPriority)
	})
}

// TakeOver implements delivery.Queue.
func (q *Queue) TakeOver(ctx context.Context, p *delivery.TakeOverParams) ([]delivery.Delivery, error) {
	keep, conns := set(p.Keep), set(p.Conns)
	return q.claim(ctx, &p.ClaimParams, func(rw *row, r delivery.ClaimRequest, now time.Time) bool {
		return rw.takeable(now, p.Node, r.MaxPriority, keep, conns)
	})
}

func set(ss []string) map[string]bool {
	m := make(map[string]bool, len(ss))
	for _, s := range ss {
		m[s] = true
	}
	return m
}

func (q *Queue) claim(ctx context.Context, p *delivery.ClaimParams, ok func(rw *row, r delivery.ClaimRequest, now time.Time) bool) ([]delivery.Delivery, error) {
	q.mu.Lock()
	hook := q.claimHook
	q.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, p); err != nil {
			return nil, err
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.down {
		return nil, errDown
	}
	now := q.now()
	var out []delivery.Delivery
	for _, r := range p.Requests {
		n := int32(0)
		for _, id := range q.byMem[r.MemberID] {
			if n >= r.Limit {
				break
			}
			rw := q.rows[delivery.Key{MessageID: id, MemberID: r.MemberID}]
			if !ok(rw, r, now) {
				continue
			}
			n++
			prev := rw.leaseConn
			rw.leaseConn, rw.leaseNode, rw.leaseExpires = r.Conn, p.Node, now.Add(p.Lease)
			rw.attempts++
			m := rw.msg
			out = append(out, delivery.Delivery{
				MessageID: m.id, MemberID: r.MemberID, Conn: r.Conn, Attempts: rw.attempts, PrevConn: prev,
				MeshID: m.MeshID, SenderMemberID: m.SenderMemberID, SenderPubkey: m.SenderPubkey, SenderName: m.SenderName,
				TargetSpec: m.TargetSpec, Priority: m.Priority, Nonce: m.Nonce, Ciphertext: m.Ciphertext,
				ClientMessageID: m.ClientMessageID, CreatedAt: m.createdAt,
			})
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].MemberID != out[j].MemberID {
			return out[i].MemberID < out[j].MemberID
		}
		return out[i].MessageID < out[j].MessageID
	})
	return out, nil
}

// eachKey runs fn over keys that Postgres would take, and returns the
// *RowsError of those it would refuse (nil when none).
func eachKey(keys []delivery.Key, fn func(k delivery.Key)) error {
	var re *delivery.RowsError
	for i, k := range keys {
		if err := storable(k.MemberID); err != nil {
			if re == nil {
				re = &delivery.RowsError{Errs: make([]error, len(keys))}
			}
			re.Errs[i] = err
			continue
		}
		fn(k)
	}
	if re == nil {
		return nil
	}
	return re
}

// MarkDelivered implements delivery.Queue.
func (q *Queue) MarkDelivered(ctx context.Context, p *delivery.MarkParams) ([]delivery.Key, error) {
	q.mu.Lock()
	hook := q.markHook
	q.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, p); err != nil {
			return nil, err
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.down {
		return nil, errDown
	}
	now := q.now()
	var done []delivery.Key
	err := eachKey(p.Keys, func(k delivery.Key) {
		rw := q.rows[k]
		if rw == nil || rw.delivered || rw.expired {
			return
		}
		if p.Node != "" && rw.leaseExpires.After(now) && rw.leaseNode != p.Node {
			return // taken over: fenced
		}
		rw.delivered, rw.leaseExpires = true, time.Time{}
		done = append(done, k)
	})
	return done, err
}

// ReleaseLeases implements delivery.Queue.
func (q *Queue) ReleaseLeases(_ context.Context, p *delivery.ReleaseParams) (int64, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.down {
		return 0, errDown
	}
	var n int64
	seen := map[delivery.Key]bool{}
	err := eachKey(p.Keys, func(k delivery.Key) {
		rw := q.rows[k]
		if rw == nil || rw.delivered || rw.leaseConn != p.Conn || seen[k] {
			return
		}
		seen[k] = true
		rw.leaseConn, rw.leaseNode, rw.leaseExpires = "", "", time.Time{}
		n++
	})
	return n, err
}

// ReleaseNodeLeases implements delivery.Queue.
func (q *Queue) ReleaseNodeLeases(_ context.Context, p *delivery.ReleaseNodeParams) ([]delivery.MemberRef, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.down {
		return nil, errDown
	}
	now := q.now()
	seen := map[string]bool{}
	var out []delivery.MemberRef
	for _, rw := range q.rows {
		if rw.delivered || rw.expired || !rw.leaseExpires.After(now) || rw.leaseNode == "" ||
			rw.leaseNode == p.Keep || !like(rw.leaseNode, p.Pattern) {
			continue
		}
		rw.leaseConn, rw.leaseNode, rw.leaseExpires = "", "", time.Time{}
		if mesh, ok := q.members[rw.member]; ok && !seen[rw.member] {
			seen[rw.member] = true
			out = append(out, delivery.MemberRef{MeshID: mesh, MemberID: rw.member})
		}
	}
	return out, nil
}

// ExpireDue implements delivery.Queue.
func (q *Queue) ExpireDue(_ context.Context, p *delivery.ExpireParams) ([]delivery.Expired, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.down {
		return nil, errDown
	}
	now := q.now()
	var out []delivery.Expired
	for k, rw := range q.rows {
		if len(out) >= p.Limit {
			break
		}
		if rw.delivered || rw.expired || rw.msg.expiresAt.After(now) {
			continue
		}
		rw.expired, rw.leaseConn, rw.leaseExpires = true, "", time.Time{}
		out = append(out, delivery.Expired{Key: k, MeshID: rw.msg.MeshID})
	}
	return out, nil
}

// Row is what a test may inspect of a delivery row.
type Row struct {
	LeaseConn, LeaseNode string
	Leased               bool // a lease that has not run out
	Attempts             int32
	Delivered, Expired   bool
}

// Row returns a delivery row's state, false when there is none.
func (q *Queue) Row(k delivery.Key) (Row, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	rw := q.rows[k]
	if rw == nil {
		return Row{}, false
	}
	return Row{LeaseConn: rw.leaseConn, LeaseNode: rw.leaseNode, Leased: rw.leaseExpires.After(q.now()),
		Attempts: rw.attempts, Delivered: rw.delivered, Expired: rw.expired}, true
}

// like is SQL LIKE with % and _ and backslash escapes.
func like(s, pattern string) bool {
	if pattern == "" {
		return s == ""
	}
	switch c := pattern[0]; c {
	case '%':
		for i := 0; i <= len(s); i++ {
			if like(s[i:], pattern[1:]) {
				return true
			}
		}
		return false
	case '_':
		return s != "" && like(s[1:], pattern[1:])
	case '\\':
		if len(pattern) > 1 {
			return s != "" && s[0] == pattern[1] && like(s[1:], pattern[2:])
		}
	}
	return s != "" && s[0] == pattern[0] && like(s[1:], pattern[1:])
}
