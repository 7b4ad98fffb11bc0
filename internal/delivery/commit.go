package delivery

import (
	"context"
	"errors"
	"hash/fnv"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/startstop"
)

// Send is one accepted send waiting for its group commit.
type Send struct {
	From    Sender
	ReqID   string // the frame's _reqId, echoed in the ack
	ID      string // the client's correlation id
	Message NewMessage
	fast    []Recipient // per recipient: the local session it goes to directly, or nil
	held    []bool      // per recipient: its push waits for a claim in flight (park.go)
}

func (s *Send) answer(a protocol.Ack) <-chan struct{} {
	a.Type, a.ReqID, a.ID = protocol.TypeAck, s.ReqID, s.ID
	return s.From.Answer(a)
}

// committer group-commits sends: each shard takes whatever accumulated
// while its previous commit ran and writes it in one statement (run,
// commitrun.go). A sender's sends always go to the same shard, so they
// commit (and are acked and pushed) in order.
type committer struct {
	startstop.Base
	e       *Engine
	shards  []chan *Send
	abandon atomic.Bool // stop without committing what is queued (a crash)
	// mu orders submits against the end of Stop: once closed, no send
	// enters a shard nobody reads.
	mu     sync.RWMutex
	closed bool
	// stuckAfter: see commitrun.go.
	stuckAfter time.Duration
}

// Batch bounds.
const (
	maxBatchMessages   = 512
	maxBatchRecipients = 8192
)

func newCommitter(e *Engine, shards int) *committer {
	c := &committer{e: e, shards: make([]chan *Send, shards), stuckAfter: stuckAfter}
	for i := range c.shards {
		c.shards[i] = make(chan *Send, 1024)
	}
	return c
}

func (c *committer) Start(ctx context.Context) error {
	if _, ok := c.StartInit(ctx); !ok {
		return nil
	}
	for _, ch := range c.shards {
		c.Go(func(ctx context.Context) { c.run(ctx, ch) })
	}
	return nil
}

// Stop commits what is queued and stops the shards; a send that arrives
// meanwhile is refused as unavailable.
func (c *committer) Stop(ctx context.Context) {
	c.Base.Stop(ctx)
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	if c.abandon.Load() {
		return
	}
	for _, ch := range c.shards {
		for {
			select {
			case s := <-ch:
				c.reject(s, protocol.CodeUnavailable)
				continue
			default:
			}
			break
		}
	}
}

// submit queues a send; it blocks when the shard is full, which
// back-pressures the sender's read loop.
func (c *committer) submit(s *Send) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	stopping := c.Stopping()
	select {
	case <-stopping:
		c.reject(s, protocol.CodeUnavailable)
		return
	default:
	}
	if c.closed {
		c.reject(s, protocol.CodeUnavailable)
		return
	}
	h := fnv.New32a()
	h.Write([]byte(s.Message.SenderMemberID))
	select {
	case c.shards[h.Sum32()%uint32(len(c.shards))] <- s:
	case <-stopping:
		c.reject(s, protocol.CodeUnavailable)
	case <-s.From.Done():
	}
}

// reject answers a send that was not committed.
func (c *committer) reject(s *Send, code string) {
	c.e.m.MessagesRejected.WithLabelValues(code).Inc()
	s.answer(protocol.Ack{Queued: false, Error: code})
}

// commit writes one batch and, after the commit, acks the senders, pushes
// the fast-path rows and wakes local and remote recipients.
func (c *committer) commit(ctx context.Context, batch []*Send) {
	e := c.e
	p := c.plan(batch)
	var settling []string
	defer func() {
		e.settled(settling) // after settle's pushes and releases
		e.TestSignals.Settled.Signal(len(batch))
	}()
	start := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if ctx.Err() != nil {
		// Stopping: still commit what was accepted.
		cctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	}
	res, err := e.q.InsertMessages(cctx, p)
	cancel()
	e.m.CommitDuration.Observe(time.Since(start).Seconds())
	e.m.CommitBatchSize.Observe(float64(len(batch)))
	if err != nil {
		code := protocol.CodeInternal
		if errors.Is(err, ErrUnavailable) {
			code = protocol.CodeUnavailable
		}
		e.logger.Warn("send commit failed", "err", err, "messages", len(batch))
		for _, s := range batch {
			c.reject(s, code)
		}
		return
	}
	e.TestSignals.Committed.Signal(len(batch))
	e.m.RelaySent.Add(float64(len(p.WakeChannels) + len(p.Envelopes)))
	settling = append(settling, c.settle(batch, res, time.Now())...)
}

// plan decides how each row of a batch travels and builds the insert.
// Local fast path: a recipient with an eligible, caught-up session on this
// node gets its row already leased to that session. Members hosted by
// other nodes learn of their rows from notifications that commit with the
// batch: no second transaction, and nothing is announced that did not
// commit. A member whose only session is live on another node gets the row
// leased to that session and carried whole in an envelope (the remote fast
// path: that node pushes it without a claim); others get a wake-up and
// their node claims.
//
// A member whose rows of the batch start with direct pushes and go on to
// the claim path (its session's room ran out) gets those first rows
// written leased to this node, as held rows are (see fastPath), not to the
// session alone: the later rows are claimable from the commit on, while a
// direct push waits for the batch to settle, and a claim in between would
// push the later ones first. Claimable in order, the first rows go with
// them, and the settle pushes what no claim took (settleHeld).
func (c *committer) plan(batch []*Send) *InsertParams {
	e := c.e
	msgs := make([]NewMessage, len(batch))
	taken := map[Recipient]int{}    // queue room promised to this batch's direct pushes
	direct := map[string][][2]int{} // member → its direct (not held) rows so far: (send, recipient)
	holding := map[string]bool{}    // members with a held row in this batch
	blocked := map[string]bool{}    // members with a row of this batch kept off the fast path
	for i, s := range batch {
		s.fast = make([]Recipient, len(s.Message.Recipients))
		s.held = make([]bool, len(s.Message.Recipients))
		for j := range s.Message.Recipients {
			member := s.Message.Recipients[j].MemberID
			if blocked[member] {
				continue
			}
			r, hold, block := e.fastPath(member, int(s.Message.Priority), taken, holding[member])
			if r == nil {
				blocked[member] = block
				for _, at := range direct[member] {
					// A split: the direct rows before become held rows.
					batch[at[0]].held[at[1]], holding[member] = true, true
					batch[at[0]].Message.Recipients[at[1]].LeaseNode = e.leaseNode
				}
				delete(direct, member)
				continue
			}
			taken[r]++
			s.fast[j] = r
			s.Message.Recipients[j].LeaseConn = r.ConnID()
			if !hold {
				direct[member] = append(direct[member], [2]int{i, j})
			}
			if hold {
				// Leased to this node as a remote fast-path row is, so
				// that any claim of this node still takes it in order.
				s.held[j], holding[member] = true, true
				s.Message.Recipients[j].LeaseNode = e.leaseNode
			}
		}
	}
	now := time.Now()
	prefix := relay.EnvelopePrefix(now)
	envelopes := len(batch) <= maxEnvelopeBatch
	var envs []EnvelopeNotify
	remote := map[string][]string{} // mesh → members to wake elsewhere
	claimed := map[string]bool{}    // members with a row of this batch on the claim path
	for i, s := range batch {
		for j, rec := range s.Message.Recipients {
			if s.fast[j] != nil {
				continue
			}
			if envelopes && !claimed[rec.MemberID] {
				if conn, node, pending, ok := c.envelope(s, rec.MemberID, prefix); ok {
					envs = append(envs, EnvelopeNotify{Ord: i, Pending: pending})
					s.Message.Recipients[j].LeaseConn, s.Message.Recipients[j].LeaseNode = conn, node
					continue
				}
			}
			// Later rows of the member in this batch must not overtake
			// this one: they take the claim path too.
			claimed[rec.MemberID] = true
			if _, elsewhere := e.dir.MemberPresent(rec.MemberID); elsewhere {
				remote[s.Message.MeshID] = append(remote[s.Message.MeshID], rec.MemberID)
			}
		}
		msgs[i] = s.Message
	}
	channels, payloads := relay.Notifications(now, remote)
	return &InsertParams{Messages: msgs, TTL: e.cfg.MessageTTL, LeaseNode: e.leaseNode, Lease: e.cfg.LeaseDuration,
		WakeChannels: channels, WakePayloads: payloads, Envelopes: envs}
}

// settle answers a committed batch. Each sender's ack is queued before any
// push of its message (the original broker's order: a client may count a
// push only once it has the ack), and the push waits on the wire for it.
// It returns the members settleHeld counted settling.
func (c *committer) settle(batch []*Send, res []Inserted, committed time.Time) (settling []string) {
	e := c.e
	wakeLocal := map[string]struct{}{}
	// A session whose queue refused a direct push gets none of this
	// batch's later rows either (they would overtake the refused one):
	// they go back to the queue with it.
	refused := map[Recipient][]Key{}
	queued := map[[2]string][]QueuedMessage{} // (mesh, sender) → its messages of this batch
	var senders [][2]string                   // keys of queued, in batch order
	for i, s := range batch {
		r := res[i]
		if r.Err != nil {
			// This message alone was not committed; the batch's others were.
			c.reject(s, c.rowFailed(r.Err))
			continue
		}
		if r.Duplicate {
			s.answer(protocol.Ack{MessageID: strconv.FormatInt(r.ID, 10), Queued: true, Duplicate: true})
			continue
		}
		acked := s.answer(protocol.Ack{MessageID: strconv.FormatInt(r.ID, 10), Queued: true})
		for j, rec := range s.Message.Recipients {
			if f := s.fast[j]; f != nil {
				k := Key{MessageID: r.ID, MemberID: rec.MemberID}
				d := fromSend(r, s, rec.MemberID, f.ConnID())
				if later, ok := refused[f]; ok {
					refused[f] = append(later, k)
				} else if s.held[j] {
					d.Attempts = 0
					ok, counted := e.settleHeld(f, d, committed, acked)
					if counted {
						settling = append(settling, rec.MemberID)
					}
					if !ok {
						refused[f] = nil
					}
				} else if !e.deliver(f, d, committed, acked) {
					refused[f] = nil
				}
				continue
			}
			if e.HasLocal(rec.MemberID) {
				wakeLocal[rec.MemberID] = struct{}{}
			}
		}
		m := &s.Message
		k := [2]string{m.MeshID, m.SenderMemberID}
		if _, ok := queued[k]; !ok {
			senders = append(senders, k)
		}
		queued[k] = append(queued[k], QueuedMessage{ID: r.ID, Target: m.TargetSpec, Priority: protocol.PriorityName(int(m.Priority)),
			Size: len(m.Ciphertext) + len(m.Nonce), Recipients: len(m.Recipients)})
	}
	// One audit event per sender and batch, as for deliveries: a burst
	// writes a fraction of a row per message instead of one.
	for _, k := range senders {
		e.audit.MessagesQueued(k[0], k[1], committed, queued[k])
	}
	for f, keys := range refused {
		if len(keys) > 0 {
			e.Release(f.ConnID(), f.MeshID(), f.MemberID(), keys)
		}
	}
	if len(wakeLocal) > 0 {
		members := make([]string, 0, len(wakeLocal))
		for m := range wakeLocal {
			members = append(members, m)
		}
		e.Wake(ReasonLocal, members...)
	}
	return settling
}

// rowFailed accounts for a row of a batch that was not written while the
// others were, and returns the wire code for it: malformed when the queue
// refused its values (edge validation should have caught them),
// unavailable when it went away while the batch was split.
func (c *committer) rowFailed(err error) string {
	switch {
	case errors.Is(err, ErrRefused):
		c.e.m.BatchRowsFailed.WithLabelValues("send").Inc()
		c.e.logger.Warn("row refused by Postgres; the rest of its batch was written", "batch", "send", "err", err)
		if errors.Is(err, ErrBadValue) {
			return protocol.CodeMalformed
		}
		return protocol.CodeInternal
	case errors.Is(err, ErrUnavailable):
		return protocol.CodeUnavailable
	}
	return protocol.CodeInternal
}

// The remote fast path costs a notification per row, the claim path a
// statement per batch and node: at moderate rates (small batches) the
// envelopes save a claim per message and its round trip, while a burst
// (large batches) is cheaper claimed. Measured with meshbench over 3
// nodes: 100 × 1000 drained in 13.7 s with envelopes for every row against
// 12.1 s without; at 2,000 msg/s (batches of 1–2) envelopes cut Postgres
// CPU by 13% and cross-node p50 by 2 ms. A broadcast to a large mesh is
// likewise cheaper as wake-ups than as one envelope per member.
const (
	maxEnvelopeBatch      = 16 // messages in the batch
	maxEnvelopeRecipients = 32 // recipients of the message
)

// envelope decides whether member's row of s takes the remote fast path:
// the member's only session is live on another node and its status lets
// the priority through, and the envelope fits in a notification.
func (c *committer) envelope(s *Send, member, prefix string) (conn, node string, p relay.Pending, ok bool) {
	m := &s.Message
	if c.e.cfg.DisableRemoteFastPath || len(m.Recipients) > maxEnvelopeRecipients {
		return "", "", p, false
	}
	e, found := c.e.dir.SoleRemoteSession(member)
	if !found || e.MaxPriority() < int(m.Priority) || e.ConnID == "" || !c.e.answering(e.Owner) {
		// A node that does not answer may be dead: its sessions' rows go
		// by wake-up, for whichever session takes them over.
		return "", "", p, false
	}
	node = LeaseNodeName(e.Owner, e.OwnerInc)
	p, ok = relay.NewPending(relay.NodeChannel(e.Owner), prefix, &relay.Envelope{
		Node: node, Presence: e.PresenceID, Conn: e.ConnID, MeshID: m.MeshID, MemberID: member,
		Priority: m.Priority, SenderMemberID: m.SenderMemberID, SenderPubkey: m.SenderPubkey,
		SenderName: m.SenderName, TargetSpec: m.TargetSpec, Nonce: m.Nonce,
		Ciphertext: m.Ciphertext, ClientMessageID: m.ClientMessageID,
	})
	return e.ConnID, node, p, ok
}

func fromSend(r Inserted, s *Send, member, conn string) Delivery {
	m := &s.Message
	return Delivery{
		MessageID: r.ID, MemberID: member, Conn: conn, Attempts: 1,
		MeshID: m.MeshID, SenderMemberID: m.SenderMemberID, SenderPubkey: m.SenderPubkey,
		SenderName: m.SenderName, TargetSpec: m.TargetSpec, Priority: m.Priority,
		Nonce: m.Nonce, Ciphertext: m.Ciphertext, ClientMessageID: m.ClientMessageID,
		CreatedAt: r.CreatedAt,
	}
}
