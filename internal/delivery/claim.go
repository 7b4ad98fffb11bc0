package delivery

import (
	"context"
	"errors"
	"time"

	"github.com/claudemesh/broker/internal/relay"
)

// Reason records why a member needs a claim; the counters use the most
// specific one.
type Reason uint16

const (
	ReasonHello    Reason = 1 << iota // a session connected
	ReasonLocal                       // a send on this node committed rows for it
	ReasonNotify                      // a relay notification named it
	ReasonStatus                      // its status now accepts more priorities
	ReasonRelease                     // leases were given back
	ReasonMore                        // the last claim hit its limit
	ReasonBacklog                     // re-scan after (re)LISTEN
	ReasonSweep                       // periodic safety re-scan
	ReasonTakeOver                    // take over leases of nodes not answering (takeover.go)
)

func (r Reason) label() string {
	switch {
	case r&ReasonHello != 0:
		return "hello"
	case r&ReasonLocal != 0:
		return "local"
	case r&ReasonNotify != 0:
		return "notify"
	case r&ReasonStatus != 0:
		return "status"
	case r&ReasonRelease != 0:
		return "release"
	case r&ReasonMore != 0:
		return "more"
	case r&ReasonBacklog != 0:
		return "backlog"
	case r&ReasonTakeOver != 0:
		return "takeover"
	}
	return "sweep"
}

// claimLimit bounds the rows claimed for one member per round.
const claimLimit = 256

// localMember is the delivery state of a member with sessions here.
// Guarded by Engine.mu.
type localMember struct {
	meshID   string
	sessions []Recipient
	dirty    Reason // non-zero: rows may be waiting
	inflight bool   // a claim for it is running
	// releasing counts lease releases of its rows not yet committed. While
	// one runs, the released rows still look leased: a claim would skip
	// them and push newer rows first, and so would the fast paths.
	releasing int
	// releases counts the lease releases of its rows ever begun: a claim
	// during which one began may have read newer rows while the released
	// ones still looked leased (claimChunks).
	releases uint64
	// directing counts envelopes being reserved and pushed on a session
	// outside the engine's lock (RelayEnvelope): no claim starts
	// meanwhile, so none can take and push the row, or a later one of the
	// member while this one's push is refused and given back, in between.
	directing int
	// settling counts this node's commits pushing a held row of it as
	// they settle (settleHeld) that have not settled yet. No claim starts
	// meanwhile: the batch's later rows of the member are claimable, and a
	// claim that took them while this push is refused and given back would
	// push them first. Fast paths are not held back by it.
	settling int
	// gone are connections its sessions replaced on other nodes, whose
	// rows its next takeover takes (takeover.go).
	gone []string
	// parked are envelopes that arrived while its claim was in flight
	// (lease.go), and their size.
	parked      []relay.Envelope
	parkedBytes int
	// held are rows of this node's commits leased to its sessions while
	// its claim was in flight, whose pushes wait for that claim (park.go),
	// and their size.
	held      []heldRow
	heldBytes int
}

// busy reports whether something about the member's rows is in flight.
func (lm *localMember) busy() bool { return lm.inflight || lm.releasing > 0 || lm.directing > 0 }

// caughtUp reports whether a new row may be pushed directly: nothing is
// waiting or in flight, so the push cannot overtake an older row.
func (lm *localMember) caughtUp() bool { return lm.dirty == 0 && !lm.busy() }

// forget drops the member's state once nothing refers to it; mu is held.
func (e *Engine) forget(member string, lm *localMember) {
	if len(lm.sessions) == 0 && !lm.busy() && lm.settling == 0 {
		delete(e.members, member)
	}
}

// Attach makes a session a delivery target and claims what waits for its
// member, taking over the leases of nodes that do not answer and of the
// connections it replaced (takeover.go). A send-only session never is
// one.
func (e *Engine) Attach(r Recipient, replaced ...Replaced) {
	if r.SendOnly() {
		return
	}
	e.mu.Lock()
	lm := e.members[r.MemberID()]
	if lm == nil {
		lm = &localMember{meshID: r.MeshID()}
		e.members[r.MemberID()] = lm
	}
	lm.sessions = append(lm.sessions, r)
	lm.dirty |= ReasonHello
	if e.live != nil {
		lm.dirty |= ReasonTakeOver
	}
	e.mu.Unlock()
	if e.live != nil {
		e.replacedConns(r, replaced)
	}
	e.Kick()
}

// Detach stops delivering to a session.
func (e *Engine) Detach(r Recipient) {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[r.MemberID()]
	if lm == nil {
		return
	}
	for i, x := range lm.sessions {
		if x == r {
			lm.sessions = append(lm.sessions[:i], lm.sessions[i+1:]...)
			break
		}
	}
	e.forget(r.MemberID(), lm)
}

// HasLocal reports whether a member has a delivery target here.
func (e *Engine) HasLocal(member string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[member]
	return lm != nil && len(lm.sessions) > 0
}

// beginRelease holds back claims and fast paths of a member whose leases
// are being released; endRelease lets them go and asks for a claim.
func (e *Engine) beginRelease(member string) {
	e.mu.Lock()
	if lm := e.members[member]; lm != nil {
		lm.releasing++
		lm.releases++
	}
	e.mu.Unlock()
}

func (e *Engine) endRelease(member string) {
	e.mu.Lock()
	lm := e.members[member]
	if lm != nil && lm.releasing > 0 {
		lm.releasing--
		lm.dirty |= ReasonRelease
		e.forget(member, lm)
	}
	e.mu.Unlock()
	if lm != nil {
		e.Kick()
	}
}

// Wake marks members (those with sessions here) as needing a claim.
func (e *Engine) Wake(why Reason, members ...string) {
	n := 0
	e.mu.Lock()
	for _, m := range members {
		if lm := e.members[m]; lm != nil {
			lm.dirty |= why
			n++
		}
	}
	e.mu.Unlock()
	if n > 0 {
		e.Kick()
	}
}

// WakeMesh marks every local member of a mesh.
func (e *Engine) WakeMesh(mesh string, why Reason) {
	n := 0
	e.mu.Lock()
	for _, lm := range e.members {
		if lm.meshID == mesh {
			lm.dirty |= why
			n++
		}
	}
	e.mu.Unlock()
	if n > 0 {
		e.Kick()
	}
}

// WakeAll marks every local member.
func (e *Engine) WakeAll(why Reason) {
	e.mu.Lock()
	for _, lm := range e.members {
		lm.dirty |= why
	}
	n := len(e.members)
	e.mu.Unlock()
	if n > 0 {
		e.Kick()
	}
}

// fastPath picks a local session to receive a new row directly: the member
// must be caught up, so the direct push cannot overtake older rows, and
// the session's queue must have room for it besides the pushes already
// promised to it (taken). It returns nil otherwise.
//
// While a claim for the member is in flight (and nothing else makes it
// need one) the row is still written leased to the session, but its push
// is held until the claim ends (hold, park.go): then hold is true, and so
// it is for every later row of the member in the batch (mustHold) once one
// is. blocked reports that the member's state or its sessions' room, not
// their status, ruled the fast path out: later rows of the batch must not
// take it either.
func (e *Engine) fastPath(member string, priority int, taken map[Recipient]int, mustHold bool) (r Recipient, hold, blocked bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[member]
	if lm == nil {
		return nil, false, false
	}
	hold = mustHold || !lm.caughtUp()
	if !lm.caughtUp() && !(lm.canHold() && len(lm.held) < maxParked) {
		return nil, false, true
	}
	takes := false // some session accepts the priority
	for _, r := range lm.sessions {
		if r.MaxPriority() < priority {
			continue
		}
		takes = true
		if r.Room()-taken[r]-len(lm.held) > 0 && !r.Closing() {
			return r, hold, false
		}
	}
	return nil, false, takes
}

// settled ends the settling of a batch's members (settleHeld), once its
// commit has settled (pushed its rows, begun the releases of those
// refused) or failed, and kicks the claims that waited for it.
func (e *Engine) settled(members []string) {
	if len(members) == 0 {
		return
	}
	kick := false
	e.mu.Lock()
	for _, m := range members {
		if lm := e.members[m]; lm != nil && lm.settling > 0 {
			lm.settling--
			kick = kick || (lm.settling == 0 && lm.dirty != 0)
			e.forget(m, lm)
		}
	}
	e.mu.Unlock()
	if kick {
		e.Kick()
	}
}

// take records that a remote fast-path row is being handled, and reports
// false when it already was.
func (e *Engine) take(k Key, now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, done := e.taken[k]; done {
		return false
	}
	e.taken[k] = now
	return true
}

// wasTaken reports whether a remote fast-path row was handled already.
func (e *Engine) wasTaken(k Key) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.taken[k]
	return ok
}

func (e *Engine) pruneTaken(before time.Time) {
	e.mu.Lock()
	for k, at := range e.taken {
		if at.Before(before) {
			delete(e.taken, k)
		}
	}
	e.mu.Unlock()
}

// pick chooses the session a member's claim goes to: the one accepting
// the most priorities, then the one with the most queue room.
func (lm *localMember) pick() Recipient {
	var best Recipient
	bestRoom := 0
	for _, r := range lm.sessions {
		if r.Closing() {
			continue
		}
		room := r.Room()
		if best == nil || r.MaxPriority() > best.MaxPriority() || (r.MaxPriority() == best.MaxPriority() && room > bestRoom) {
			best, bestRoom = r, room
		}
	}
	return best
}

func (e *Engine) claimLoop(ctx context.Context) {
	sweep := time.NewTicker(e.cfg.SweepInterval)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			e.pruneTaken(time.Now().Add(-takenTTL))
			why := ReasonSweep
			if e.someSilent() {
				why |= ReasonTakeOver
			}
			e.WakeAll(why)
		case <-e.signal:
			e.claimRound(ctx)
		}
	}
}

type claimTarget struct {
	r      Recipient
	reason Reason
	limit  int32
	got    int32
	// takeover: the claim is a TakeOver, which also takes gone's rows.
	takeover bool
	gone     []string
	// refused: the claim's rows (from here on) are not pushed but go back
	// to the queue (held), so as not to overtake an older row: one the
	// session's queue refused, or one whose release began while the claim
	// ran (releases, the member's count when the claim was planned).
	refused  bool
	held     []Key
	releases uint64
}

// claimRound claims for every dirty member in one statement per chunk.
func (e *Engine) claimRound(ctx context.Context) {
	targets, reqs := e.claimTargets()
	if len(reqs) == 0 {
		e.TestSignals.ClaimRound.Signal(ClaimRound{})
		return
	}
	rows, failed, timedOut := e.claimAndPush(ctx, targets, reqs)
	for id, t := range targets {
		if len(t.held) > 0 {
			e.Release(t.r.ConnID(), t.r.MeshID(), id, t.held)
		}
	}
	more := false
	var parked []relay.Envelope
	var holding []string // members whose held rows are pushed now
	var left map[string][]heldRow
	e.mu.Lock()
	for id, t := range targets {
		lm := e.members[id]
		if lm == nil {
			continue
		}
		if t.got >= t.limit {
			lm.dirty |= ReasonMore
			more = true
		}
		if len(lm.held) > 0 {
			if lm.dirty == 0 && lm.releasing == 0 {
				// Nothing older waits: push them, still in flight.
				holding = append(holding, id)
				continue
			}
			if left == nil {
				left = map[string][]heldRow{}
			}
			left[id] = lm.takeHeld()
		}
		lm.inflight = false
		parked = append(parked, lm.unpark()...)
		e.forget(id, lm)
	}
	e.mu.Unlock()
	for id, rows := range left {
		e.leaveHeld(id, rows) // the claim came back full: the next one takes them
	}
	for _, id := range holding {
		parked = append(parked, e.pushHeld(id)...)
	}
	e.relayParked(parked)
	e.TestSignals.ClaimRound.Signal(ClaimRound{Members: len(reqs), Rows: rows, Failed: failed})
	if failed && timedOut {
		// The claim was too large to finish in time: it shrank (shrink);
		// try again at once with the smaller one.
		e.Kick()
		return
	}
	if failed {
		// Queue trouble: back off before the next attempt.
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
		e.Kick()
		return
	}
	if more {
		e.Kick()
	}
}

// claimTargets picks, under the lock, the session each dirty member's
// claim goes to, and marks those members in flight.
func (e *Engine) claimTargets() (map[string]*claimTarget, []ClaimRequest) {
	targets := map[string]*claimTarget{}
	var reqs []ClaimRequest
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, lm := range e.members {
		if lm.dirty == 0 || lm.busy() || lm.settling > 0 {
			continue // settled (committer.commit) kicks the round again
		}
		r := lm.pick()
		if r == nil {
			lm.dirty = 0
			continue
		}
		// Leave room in the queue for acks and replies.
		limit := min(claimLimit, r.Room())
		if limit <= 0 {
			r.Starved() // the write loop kicks us when it drains
			continue
		}
		targets[id] = &claimTarget{r: r, reason: lm.dirty, limit: int32(limit),
			takeover: lm.dirty&ReasonTakeOver != 0 && e.live != nil, gone: lm.gone, releases: lm.releases}
		reqs = append(reqs, ClaimRequest{MemberID: id, Conn: r.ConnID(), MaxPriority: int16(r.MaxPriority()), Limit: int32(limit)})
		lm.dirty, lm.inflight, lm.gone = 0, true, nil
	}
	return targets, reqs
}

// Claim statement bounds. A statement asks for at most claimChunk members
// and e.claimBudget rows (the sum of its requests' limits): the budget
// starts at maxClaimRows, halves each time a statement runs out of time
// (down to minClaimRows), and doubles back after every growStreak that
// finish in a row, so a claim that cannot finish in time shrinks instead
// of failing the same way again, and the size that failed is tried again
// only after a run of successes.
const (
	claimChunk   = 2000
	maxClaimRows = 1 << 16
	minClaimRows = 16
	growStreak   = 4
)

// claimAndPush runs the round's takeovers, then its claims, in chunks, and
// pushes what they lease. On a failure the members not claimed for are
// marked dirty again.
func (e *Engine) claimAndPush(ctx context.Context, targets map[string]*claimTarget, reqs []ClaimRequest) (rows int, failed, timedOut bool) {
	var plain, take []ClaimRequest
	var gone []string
	for _, r := range reqs {
		if t := targets[r.MemberID]; t.takeover {
			take = append(take, r)
			gone = append(gone, t.gone...)
		} else {
			plain = append(plain, r)
		}
	}
	var keep []string
	if len(take) > 0 {
		keep = e.keep()
	}
	takeOver := func(cctx context.Context, p *ClaimParams) ([]Delivery, error) {
		return e.q.TakeOver(cctx, &TakeOverParams{ClaimParams: *p, Keep: keep, Conns: gone})
	}
	n, failed, timedOut := e.claimChunks(ctx, targets, take, takeOver)
	rows += n
	if !failed {
		n, failed, timedOut = e.claimChunks(ctx, targets, plain, e.q.Claim)
		rows += n
	} else {
		e.redirty(targets, plain)
	}
	return rows, failed, timedOut
}

// claimChunks runs one kind of claim over reqs, chunk by chunk.
func (e *Engine) claimChunks(ctx context.Context, targets map[string]*claimTarget, reqs []ClaimRequest,
	claim func(context.Context, *ClaimParams) ([]Delivery, error)) (rows int, failed, timedOut bool) {
	for i := 0; i < len(reqs); {
		budget := e.budget()
		part := make([]ClaimRequest, 0, min(claimChunk, len(reqs)-i))
		sum := 0
		for ; i < len(reqs) && len(part) < claimChunk; i++ {
			r := reqs[i]
			r.Limit = min(r.Limit, int32(budget))
			if len(part) > 0 && sum+int(r.Limit) > budget {
				break
			}
			targets[r.MemberID].limit = r.Limit
			sum += int(r.Limit)
			part = append(part, r)
		}
		cctx, cancel := context.WithTimeout(ctx, e.cfg.StatementTimeout)
		got, err := claim(cctx, &ClaimParams{Node: e.leaseNode, Lease: e.cfg.LeaseDuration, Requests: part})
		timedOut := errors.Is(cctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				e.logger.Warn("claim failed; will retry", "err", err, "members", len(part), "rows_asked", sum)
			}
			if timedOut {
				e.shrink(sum)
			}
			e.redirty(targets, reqs[i-len(part):])
			return rows, true, timedOut
		}
		e.grow()
		rows += len(got)
		e.releasedMeanwhile(targets, part)
		now := time.Now()
		for _, d := range got {
			t := targets[d.MemberID]
			if t.takeover && d.PrevConn != "" {
				e.m.TakenOver.Inc()
			}
			e.pushClaimed(t, d, now)
		}
	}
	return rows, false, false
}

// releasedMeanwhile refuses the pushes of a claim for a member whose rows
// began to be released while it ran. A release holds back the member's
// next claim, not one already planned: a push the session's queue refused
// in a commit that settled meanwhile gives its row (and the batch's later
// ones) back, and the sender's next rows, committed for a claim, may be in
// this claim's snapshot while the released ones were still leased. So what
// it took goes back with them, and the claim after the release takes them
// all in order.
func (e *Engine) releasedMeanwhile(targets map[string]*claimTarget, part []ClaimRequest) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range part {
		if lm, t := e.members[r.MemberID], targets[r.MemberID]; lm != nil && lm.releases != t.releases && !t.refused {
			t.refused = true
			e.m.ClaimsGivenBack.Inc()
		}
	}
}

// redirty marks the members of reqs as needing their claim again, with
// the connections their takeover was to take.
func (e *Engine) redirty(targets map[string]*claimTarget, reqs []ClaimRequest) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range reqs {
		if lm := e.members[r.MemberID]; lm != nil {
			t := targets[r.MemberID]
			lm.dirty |= t.reason
			if len(lm.gone)+len(t.gone) <= maxGone {
				lm.gone = append(lm.gone, t.gone...)
			}
		}
	}
}

// budget is the rows one claim statement may ask for now.
func (e *Engine) budget() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.claimBudget == 0 {
		e.claimBudget = maxClaimRows
	}
	return e.claimBudget
}

// shrink halves the claim budget below a statement of asked rows that ran
// out of time.
func (e *Engine) shrink(asked int) {
	e.mu.Lock()
	e.claimBudget = max(minClaimRows, min(e.claimBudget, asked)/2)
	e.claimStreak = 0
	b := e.claimBudget
	e.mu.Unlock()
	e.m.ClaimShrinks.Inc()
	e.m.ClaimBudget.Set(float64(b))
	e.TestSignals.ClaimShrunk.Signal(b)
}

// grow doubles the claim budget back after growStreak statements that
// finished in a row.
func (e *Engine) grow() {
	e.mu.Lock()
	if e.claimBudget == 0 {
		e.claimBudget = maxClaimRows
	}
	grew := false
	if e.claimBudget < maxClaimRows {
		if e.claimStreak++; e.claimStreak >= growStreak {
			e.claimBudget, e.claimStreak, grew = min(maxClaimRows, e.claimBudget*2), 0, true
		}
	}
	b := e.claimBudget
	e.mu.Unlock()
	if grew {
		e.m.ClaimBudget.Set(float64(b))
	}
}

func (e *Engine) pushClaimed(t *claimTarget, d Delivery, now time.Time) {
	t.got++
	if d.PrevConn != "" && d.Attempts == 1 && !e.take(d.Key(), now) {
		// Straight from a remote fast-path lease, and its envelope already
		// pushed it. Its lease now names t.r; the session holding it acks
		// it by key, or, closing without an ack, leaves it to expire.
		return
	}
	e.m.Claims.WithLabelValues(t.reason.label()).Inc()
	if t.reason&^(ReasonBacklog|ReasonSweep) == 0 {
		via := "sweep"
		if t.reason&ReasonBacklog != 0 {
			via = "backlog"
		}
		e.m.Recovered.WithLabelValues(via).Inc()
	}
	if t.refused {
		t.held = append(t.held, d.Key())
		return
	}
	t.refused = !e.deliver(t.r, d, d.CreatedAt, nil)
}

// deliver reserves a claimed (or fast-path) row on the session and queues
// its push. A row that cannot be queued goes back to the queue: it is
// claimed again, in order, once the writer has made room. A full queue
// alone does not make a slow consumer: one that stops reading is closed by
// its write timeout.
func (e *Engine) deliver(r Recipient, d Delivery, committed time.Time, after <-chan struct{}) bool {
	switch r.Reserve(d.MessageID) {
	case Gone:
		e.Release(d.Conn, d.MeshID, d.MemberID, []Key{d.Key()})
		return false
	case AlreadyHeld:
		return true
	}
	return e.deliverReserved(r, d, committed, after)
}

// deliverReserved queues the push of a row already reserved on r.
func (e *Engine) deliverReserved(r Recipient, d Delivery, committed time.Time, after <-chan struct{}) bool {
	if e.acks.unmarkedHas(d.Key()) {
		// Acked (or written without client_ack) and about to be marked
		// delivered: a claim that raced the mark must not push it again.
		r.Unreserve(d.MessageID)
		return true
	}
	if int(d.Priority) > r.MaxPriority() {
		// The session's status changed since the row was picked for it (a
		// claim or fast path planned while it was idle; now working or
		// dnd): the row waits for a status that takes it, and the rows
		// after it go back with it, in order.
		r.Unreserve(d.MessageID)
		e.Release(d.Conn, d.MeshID, d.MemberID, []Key{d.Key()})
		return false
	}
	if r.Push(&Push{Delivery: d, Committed: committed, After: after}) {
		return true
	}
	r.Unreserve(d.MessageID)
	// Until the row is claimed again no newer one may take the fast path;
	// the writer asks for a claim once it has made room.
	r.Starved()
	e.Release(d.Conn, d.MeshID, d.MemberID, []Key{d.Key()})
	return false
}
