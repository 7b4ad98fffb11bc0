package delivery

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/relay"
)

// Release gives rows back to the queue and wakes the member's other
// sessions, here and on other nodes. Until the release has committed the
// member takes no claim and no fast path (beginRelease), so nothing newer
// overtakes the released rows. Once the engine stops, leases are left to
// run out.
func (e *Engine) Release(conn, mesh, member string, keys []Key) {
	e.beginRelease(member)
	started := e.releases.Go(func(context.Context) {
		defer e.endRelease(member)
		// Not the run context: a release asked for while stopping still
		// goes out, bounded.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := e.q.ReleaseLeases(ctx, &ReleaseParams{Conn: conn, Keys: keys}); err != nil {
			// The leases run out by themselves; the sweep then redelivers.
			e.logger.Warn("release leases failed; they will expire", "err", err, "rows", len(keys))
			var re *RowsError
			if !errors.As(err, &re) {
				return
			}
			e.m.BatchRowsFailed.WithLabelValues("release").Add(float64(re.Refused()))
		}
		if _, elsewhere := e.dir.MemberPresent(member); elsewhere {
			e.notifier.Notify(mesh, []string{member})
		}
	})
	if !started {
		e.endRelease(member)
	}
}

// ReleaseNodeLeases releases the leases of node incarnations matching the
// LIKE pattern but keep (departed ones: a node confirmed dead, or this
// node's earlier runs), and wakes their members here and elsewhere.
func (e *Engine) ReleaseNodeLeases(ctx context.Context, pattern, keep string) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	refs, err := e.q.ReleaseNodeLeases(cctx, &ReleaseNodeParams{Pattern: pattern, Keep: keep})
	if err != nil {
		if ctx.Err() == nil {
			e.logger.Warn("release node leases failed; they will expire", "pattern", pattern, "err", err)
		}
		return
	}
	if len(refs) == 0 {
		return
	}
	e.logger.Info("released leases of a departed node", "pattern", pattern, "members", len(refs))
	members := make([]string, 0, len(refs))
	for _, r := range refs {
		members = append(members, r.MemberID)
		if _, elsewhere := e.dir.MemberPresent(r.MemberID); elsewhere {
			e.notifier.Notify(r.MeshID, []string{r.MemberID})
		}
	}
	e.Wake(ReasonRelease, members...)
}

// ReleaseNode releases the leases of one departed node incarnation.
func (e *Engine) ReleaseNode(ctx context.Context, name string, incarnation int64) {
	e.ReleaseNodeLeases(ctx, EscapeLike(LeaseNodeName(name, incarnation)), "")
}

// RelayWake handles one mesh of a relay notification.
func (e *Engine) RelayWake(sentAt time.Time, w relay.Wake) {
	e.m.RelayReceived.Inc()
	if lag := time.Since(sentAt); lag >= 0 {
		e.m.RelayLag.Observe(lag.Seconds())
	}
	if w.All {
		e.WakeMesh(w.MeshID, ReasonNotify)
		return
	}
	e.Wake(ReasonNotify, w.Members...)
}

// RelayListening runs after every (re)LISTEN: anything notified while the
// listener was away is found by a re-scan.
func (e *Engine) RelayListening() {
	e.WakeAll(ReasonBacklog)
	e.TestSignals.Listening.Signal(struct{}{})
}

// RelayEnvelope handles a row carried whole by a notification (the remote
// fast path). Only the node incarnation holding the lease acts on it: it
// pushes the row to the leased session when the member is caught up (no
// claim running or due, so the push cannot overtake an older row) and the
// session's status and queue let it through. Otherwise the member is
// marked for a claim, which takes such rows in order — but an envelope
// that meets only a claim in flight for its member is pushed once that
// claim ends (parked); a session that is gone gives the row back at once.
func (e *Engine) RelayEnvelope(sentAt time.Time, env relay.Envelope) {
	key := Key{MessageID: env.MessageID, MemberID: env.MemberID}
	if env.Node != e.leaseNode {
		if strings.HasPrefix(env.Node, LeaseNodePrefix(e.cfg.Node)) {
			// Leased to an earlier incarnation of this node, whose
			// sessions are gone.
			e.Release(env.Conn, env.MeshID, env.MemberID, []Key{key})
		}
		return
	}
	e.m.RelayReceived.Inc()
	if lag := time.Since(sentAt); lag >= 0 {
		e.m.RelayLag.Observe(lag.Seconds())
	}
	if e.wasTaken(key) {
		return // a claim got here first and pushed it
	}
	if e.now().Sub(env.CreatedAt) > min(e.cfg.LeaseDuration, takenTTL)/2 {
		// Too late to trust the lease (or, replayed, to tell it from a row
		// pushed already): let a claim decide.
		e.Wake(ReasonNotify, env.MemberID)
		return
	}
	e.relayDirect(env, key)
}

// relayDirect pushes an envelope's row to its session now, parks it until
// the member's claim in flight ends, or leaves it to a claim.
func (e *Engine) relayDirect(env relay.Envelope, key Key) {
	r, verdict := e.direct(env)
	switch verdict {
	case directParked:
		return
	case directGone:
		e.Release(env.Conn, env.MeshID, env.MemberID, []Key{key})
		return
	case directClaim:
		e.Wake(ReasonNotify, env.MemberID)
		return
	}
	e.m.Claims.WithLabelValues("relayed").Inc()
	defer e.directed(env.MemberID)
	e.deliverReserved(r, Delivery{
		MessageID: env.MessageID, MemberID: env.MemberID, Conn: env.Conn, MeshID: env.MeshID,
		SenderMemberID: env.SenderMemberID, SenderPubkey: env.SenderPubkey, SenderName: env.SenderName,
		TargetSpec: env.TargetSpec, Priority: env.Priority, Nonce: env.Nonce, Ciphertext: env.Ciphertext,
		ClientMessageID: env.ClientMessageID, CreatedAt: env.CreatedAt,
	}, env.CreatedAt, nil)
}

type directVerdict int

const (
	directPush   directVerdict = iota // reserved on the session: push it
	directClaim                       // leave it to a claim
	directGone                        // its session is gone: give it back
	directParked                      // held until the member's claim in flight ends
)

// Parked envelopes: an envelope that arrives while a claim for its member
// is in flight waits for that claim to end (claimRound), and is pushed
// then unless the claim took its row, instead of costing another claim
// and its round trip. Bounded per member in count and bytes; beyond, the
// row is left to a claim (broker_delivery_parked_overflow_total).
const (
	maxParked      = 64
	maxParkedBytes = 1 << 20
)

// park holds env for the end of the member's claim; mu is held. It
// reports false when the member's bound is reached.
func (e *Engine) park(lm *localMember, env relay.Envelope) bool {
	size := len(env.Ciphertext) + len(env.Nonce) + len(env.SenderName) + len(env.TargetSpec) + 256
	if len(lm.parked) >= maxParked || lm.parkedBytes+size > maxParkedBytes {
		e.m.ParkedOverflow.Inc()
		return false
	}
	lm.parked = append(lm.parked, env)
	lm.parkedBytes += size
	return true
}

// unpark takes the envelopes parked for a member; mu is held.
func (lm *localMember) unpark() []relay.Envelope {
	out := lm.parked
	lm.parked, lm.parkedBytes = nil, 0
	return out
}

// relayParked handles envelopes parked during a claim that has ended.
func (e *Engine) relayParked(envs []relay.Envelope) {
	for _, env := range envs {
		key := Key{MessageID: env.MessageID, MemberID: env.MemberID}
		if e.wasTaken(key) {
			continue // the claim took it (and pushed it)
		}
		e.relayDirect(env, key)
	}
}

// direct reserves an envelope's row on its leased session when it may be
// pushed now: the member is caught up, the session is here, open, with
// room, accepting the priority. While the session reserves and pushes it
// (outside the engine's lock: the engine never holds it while taking a
// session's), the row is marked taken and the member directing, so no
// claim takes and pushes it, or a later row, in between.
func (e *Engine) direct(env relay.Envelope) (Recipient, directVerdict) {
	key := Key{MessageID: env.MessageID, MemberID: env.MemberID}
	e.mu.Lock()
	lm := e.members[env.MemberID]
	var r Recipient
	if lm != nil {
		for _, x := range lm.sessions {
			if x.ConnID() == env.Conn {
				r = x
				break
			}
		}
	}
	if r == nil || r.Closing() {
		e.mu.Unlock()
		return nil, directGone
	}
	_, done := e.taken[key]
	if !done && lm.inflight && lm.dirty == 0 && lm.releasing == 0 && lm.directing == 0 &&
		r.MaxPriority() >= int(env.Priority) && e.park(lm, env) {
		// Only a claim in flight holds it back: push it once that claim
		// has pushed what it took.
		e.mu.Unlock()
		return nil, directParked
	}
	if done || !lm.caughtUp() || r.MaxPriority() < int(env.Priority) || r.Room() <= 0 || e.takenFull() {
		e.mu.Unlock()
		return nil, directClaim
	}
	e.taken[key] = time.Now()
	lm.directing++
	e.mu.Unlock()

	res := r.Reserve(env.MessageID)
	if res != Reserved {
		e.mu.Lock()
		delete(e.taken, key)
		e.mu.Unlock()
		e.directed(env.MemberID)
		return nil, directClaim
	}
	return r, directPush // directing until the push is queued (directed)
}

// directed ends a direct push that direct let through: it is queued, or
// its row is being given back (its release has begun, and holds back the
// member's claims from here). Until then no claim starts: one that read
// the member's later rows would push them first.
func (e *Engine) directed(member string) {
	e.mu.Lock()
	lm := e.members[member]
	lm.directing--
	waiting := lm.dirty != 0
	e.forget(member, lm)
	e.mu.Unlock()
	if waiting {
		e.Kick() // a wake-up came while the claim was held back
	}
}
