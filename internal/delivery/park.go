package delivery

import (
	"slices"
	"time"

	"github.com/claudemesh/broker/internal/relay"
)

// Held rows: the local fast path while a claim is in flight.
//
// A row committed on this node for a member whose session is here, while a
// claim for that member is in flight, used to take the claim path (the
// fast path must not overtake the rows the claim is taking), and so did
// every later row committed during the next claim: in a burst nearly every
// row paid a claim UPDATE. Such a row is now written leased to the session
// as a remote fast-path row to this node is (lease node this incarnation,
// attempts 0: any claim of this node may still take it, in order), and its
// push is held until the claim ends (claimRound). If the claim came back
// short of its limit nothing older waits: the held rows are pushed then, in
// id order, after the claim's own pushes, unless the claim took them
// itself (taken). If it came back full, or anything else made the member
// need a claim meanwhile, the held rows are left to the next claim; those
// of a session that went away are released. Bounded like parked envelopes
// (maxParked, maxParkedBytes); a row beyond goes to a claim.

// heldRow is a committed local fast-path row waiting for a claim to end.
type heldRow struct {
	d         Delivery
	committed time.Time
	after     <-chan struct{} // the sender's ack, written before the push
}

// canHold reports whether a new row of the member may be held behind its
// claim in flight: only that claim stands in the way; mu is held.
func (lm *localMember) canHold() bool {
	return lm.inflight && lm.dirty == 0 && lm.releasing == 0 && lm.directing == 0
}

// hold keeps h for the end of the member's claim; mu is held. It reports
// false when the member's bound is reached.
func (e *Engine) hold(lm *localMember, h heldRow) bool {
	size := len(h.d.Ciphertext) + len(h.d.Nonce) + len(h.d.SenderName) + len(h.d.TargetSpec) + 256
	if len(lm.held) >= maxParked || lm.heldBytes+size > maxParkedBytes {
		e.m.ParkedOverflow.Inc()
		return false
	}
	lm.held = append(lm.held, h)
	lm.heldBytes += size
	return true
}

func (lm *localMember) takeHeld() []heldRow {
	out := lm.held
	lm.held, lm.heldBytes = nil, 0
	return out
}

// settleHeld handles a committed row that was planned to be held (its
// member had a claim in flight): it holds it if the claim still runs,
// leaves it to a claim if one is due, and pushes it now otherwise. It
// reports false when the session's queue refused it, and settling when it
// pushed (or tried to): the member then counts as settling (localMember),
// and the caller ends that with settled once its batch has settled, so
// that no claim takes the batch's later rows (claimable, like this one)
// before this one is pushed or given back.
func (e *Engine) settleHeld(r Recipient, d Delivery, committed time.Time, after <-chan struct{}) (ok, settling bool) {
	k := d.Key()
	e.mu.Lock()
	if _, done := e.taken[k]; done {
		// A claim of this node read the row (leased to it, not yet tried)
		// while this commit was settling, and took it: pushed it, or gave
		// it back for the next claim. Either way it is not ours to push.
		e.mu.Unlock()
		return true, false
	}
	lm := e.members[d.MemberID]
	if lm != nil && lm.canHold() && e.hold(lm, heldRow{d: d, committed: committed, after: after}) {
		e.mu.Unlock()
		return true, false
	}
	if lm != nil && (!lm.caughtUp() || e.takenFull()) {
		// A claim is due or running: it takes the row (claimable by this
		// node) in order.
		lm.dirty |= ReasonLocal
		e.mu.Unlock()
		e.Kick()
		return true, false
	}
	// Caught up: nothing older waits. A later claim of this node may
	// still read the row before its mark commits: it must not push it
	// again.
	e.taken[k] = time.Now()
	if lm != nil {
		lm.settling++
	}
	e.mu.Unlock()
	ok = e.deliver(r, d, committed, after)
	return ok, lm != nil
}

// pushHeld pushes the rows held for member behind the claim that has just
// ended (the member is still in flight, so no claim or fast path runs
// meanwhile), then lets the member go and returns its parked envelopes.
// Rows held while it pushes are pushed in a next pass, for a bounded
// number of passes; what remains is left to a claim.
func (e *Engine) pushHeld(member string) []relay.Envelope {
	for pass := 0; pass < 4; pass++ {
		e.mu.Lock()
		lm := e.members[member]
		if lm.dirty != 0 || lm.releasing > 0 || len(lm.held) == 0 {
			e.mu.Unlock()
			break
		}
		rows := lm.takeHeld()
		e.mu.Unlock()
		slices.SortStableFunc(rows, func(a, b heldRow) int {
			switch {
			case a.d.MessageID < b.d.MessageID:
				return -1
			case a.d.MessageID > b.d.MessageID:
				return 1
			}
			return 0
		})
		if rest := e.pushHeldRows(member, rows); len(rest) > 0 {
			e.leaveHeld(member, rest)
			break
		}
	}
	e.mu.Lock()
	lm := e.members[member]
	rest := lm.takeHeld()
	if len(rest) > 0 {
		lm.dirty |= ReasonLocal // no fast path past them meanwhile
	}
	lm.inflight = false
	parked := lm.unpark()
	e.mu.Unlock()
	if len(rest) > 0 {
		e.leaveHeld(member, rest)
	}
	e.mu.Lock()
	waiting := lm.dirty != 0
	e.forget(member, lm)
	e.mu.Unlock()
	if waiting {
		e.Kick()
	}
	return parked
}

// pushHeldRows pushes rows in order until one cannot be pushed now, and
// returns that one and those after it.
func (e *Engine) pushHeldRows(member string, rows []heldRow) []heldRow {
	for i, h := range rows {
		k := h.d.Key()
		e.mu.Lock()
		lm := e.members[member]
		var r Recipient
		for _, x := range lm.sessions {
			if x.ConnID() == h.d.Conn {
				r = x
				break
			}
		}
		if _, done := e.taken[k]; done {
			e.mu.Unlock()
			continue // the claim took it (and pushed it)
		}
		if r == nil || r.Closing() || lm.dirty != 0 || lm.releasing > 0 || int(h.d.Priority) > r.MaxPriority() || e.takenFull() {
			e.mu.Unlock()
			return rows[i:]
		}
		if r.Room() <= 0 {
			e.mu.Unlock()
			r.Starved() // the writer kicks a claim once it has room
			return rows[i:]
		}
		e.taken[k] = time.Now()
		e.mu.Unlock()
		e.m.Claims.WithLabelValues("held").Inc()
		if !e.deliver(r, h.d, h.committed, h.after) {
			return rows[i+1:] // deliver gave this one back
		}
	}
	return nil
}

// leaveHeld leaves held rows to a claim: those of sessions still here stay
// leased to this node, which any of its claims takes in order; those of
// sessions gone are released, for a session elsewhere.
func (e *Engine) leaveHeld(member string, rows []heldRow) {
	gone := map[string][]Key{}
	var conns []string
	var mesh string
	e.mu.Lock()
	lm := e.members[member]
	if lm != nil {
		lm.dirty |= ReasonLocal
	}
	for _, h := range rows {
		here := false
		if lm != nil {
			for _, x := range lm.sessions {
				if x.ConnID() == h.d.Conn && !x.Closing() {
					here = true
					break
				}
			}
		}
		if !here {
			if _, ok := gone[h.d.Conn]; !ok {
				conns = append(conns, h.d.Conn)
			}
			gone[h.d.Conn] = append(gone[h.d.Conn], h.d.Key())
			mesh = h.d.MeshID
		}
	}
	e.mu.Unlock()
	for _, c := range conns {
		e.Release(c, mesh, member, gone[c])
	}
	e.Kick()
}
