package server

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// claimReason records why a member needs a claim; the counters use the
// most specific one.
type claimReason uint16

const (
	reasonHello   claimReason = 1 << iota // a session connected
	reasonLocal                           // a send on this node committed rows for it
	reasonNotify                          // a relay notification named it
	reasonStatus                          // its status now accepts more priorities
	reasonRelease                         // leases were given back
	reasonMore                            // the last claim hit its limit
	reasonBacklog                         // re-scan after (re)LISTEN
	reasonSweep                           // periodic safety re-scan
)

func (r claimReason) label() string {
	switch {
	case r&reasonHello != 0:
		return "hello"
	case r&reasonLocal != 0:
		return "local"
	case r&reasonNotify != 0:
		return "notify"
	case r&reasonStatus != 0:
		return "status"
	case r&reasonRelease != 0:
		return "release"
	case r&reasonMore != 0:
		return "more"
	case r&reasonBacklog != 0:
		return "backlog"
	}
	return "sweep"
}

// claimLimit bounds the rows claimed for one member per round.
const claimLimit = 256

// localMember is the delivery state of a member with sessions here.
type localMember struct {
	meshID   string
	sessions []*session
	dirty    claimReason // non-zero: rows may be waiting
	inflight bool        // a claim for it is running
	// releasing counts lease releases of its rows not yet committed. While
	// one runs, the released rows still look leased: a claim would skip
	// them and push newer rows first, and so would the fast paths.
	releasing int
}

// engine moves rows from Postgres to this node's sessions. Wake-ups mark
// members dirty; one loop claims for every dirty member in a single
// statement and queues the envelopes on their sessions.
type engine struct {
	s      *Server
	signal chan struct{}

	mu      sync.Mutex
	members map[string]*localMember
	// taken holds rows leased to this node by the remote fast path that
	// were handled once: pushed from their envelope, or taken by a claim
	// straight from that lease (a sweep, or a claim for the member's other
	// rows) before the envelope arrived. The row stays claimable by this
	// node until something else leases it, so whichever comes second (the
	// envelope, or a claim that read the row before its delivery mark
	// committed) must not push it again. Entries are dropped after
	// takenTTL, far longer than an envelope's delay or a claim's timeout.
	taken map[delivery.Key]time.Time
}

const takenTTL = 2 * time.Minute

func newEngine(s *Server) *engine {
	return &engine{s: s, signal: make(chan struct{}, 1), members: map[string]*localMember{}, taken: map[delivery.Key]time.Time{}}
}

func (e *engine) kick() {
	select {
	case e.signal <- struct{}{}:
	default:
	}
}

func (e *engine) attach(ss *session) {
	e.mu.Lock()
	lm := e.members[ss.memberID]
	if lm == nil {
		lm = &localMember{meshID: ss.meshID}
		e.members[ss.memberID] = lm
	}
	lm.sessions = append(lm.sessions, ss)
	lm.dirty |= reasonHello
	e.mu.Unlock()
	e.kick()
}

func (e *engine) detach(ss *session) {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[ss.memberID]
	if lm == nil {
		return
	}
	for i, x := range lm.sessions {
		if x == ss {
			lm.sessions = append(lm.sessions[:i], lm.sessions[i+1:]...)
			break
		}
	}
	if len(lm.sessions) == 0 && !lm.inflight && lm.releasing == 0 {
		delete(e.members, ss.memberID)
	}
}

func (e *engine) hasLocal(member string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[member]
	return lm != nil && len(lm.sessions) > 0
}

// beginRelease holds back claims and fast paths of a member whose leases
// are being released; endRelease lets them go and asks for a claim.
func (e *engine) beginRelease(member string) {
	e.mu.Lock()
	if lm := e.members[member]; lm != nil {
		lm.releasing++
	}
	e.mu.Unlock()
}

func (e *engine) endRelease(member string) {
	e.mu.Lock()
	lm := e.members[member]
	if lm != nil && lm.releasing > 0 {
		lm.releasing--
		lm.dirty |= reasonRelease
		if len(lm.sessions) == 0 && !lm.inflight && lm.releasing == 0 {
			delete(e.members, member)
		}
	}
	e.mu.Unlock()
	if lm != nil {
		e.kick()
	}
}

// wake marks members (those with sessions here) as needing a claim.
func (e *engine) wake(members []string, why claimReason) {
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
		e.kick()
	}
}

// wakeMesh marks every local member of a mesh.
func (e *engine) wakeMesh(mesh string, why claimReason) {
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
		e.kick()
	}
}

func (e *engine) wakeAll(why claimReason) {
	e.mu.Lock()
	for _, lm := range e.members {
		lm.dirty |= why
	}
	n := len(e.members)
	e.mu.Unlock()
	if n > 0 {
		e.kick()
	}
}

// fastPath picks a local session to receive a new row directly: the member
// must be caught up (no claim running, nothing marked waiting), so the
// direct push cannot overtake older rows, and the session's queue must
// have room for it besides the taken pushes already promised to it. It
// returns nil otherwise.
func (e *engine) fastPath(member string, priority int, taken map[*session]int) *session {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[member]
	if lm == nil || lm.dirty != 0 || lm.inflight || lm.releasing > 0 {
		return nil
	}
	for _, ss := range lm.sessions {
		if int(ss.maxPrio.Load()) >= priority && ss.deliveryRoom()-taken[ss] > 0 && !ss.isClosing() {
			return ss
		}
	}
	return nil
}

// take records that a remote fast-path row is being handled, and reports
// false when it already was.
func (e *engine) take(k delivery.Key, now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, done := e.taken[k]; done {
		return false
	}
	e.taken[k] = now
	return true
}

// wasTaken reports whether a remote fast-path row was handled already.
func (e *engine) wasTaken(k delivery.Key) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.taken[k]
	return ok
}

func (e *engine) pruneTaken(before time.Time) {
	e.mu.Lock()
	for k, at := range e.taken {
		if at.Before(before) {
			delete(e.taken, k)
		}
	}
	e.mu.Unlock()
}

// direct reserves a row carried by an envelope for ss (enters it in the
// session's inflight set) when it may be pushed now: its member is caught
// up (no claim running or due), and ss is one of its sessions here, open,
// with room, accepting the priority. Reserving under the engine's lock
// keeps a claim from taking and pushing the row in between.
func (e *engine) direct(ss *session, messageID int64, priority int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	lm := e.members[ss.memberID]
	if lm == nil || lm.dirty != 0 || lm.inflight || lm.releasing > 0 {
		return false
	}
	for _, x := range lm.sessions {
		if x != ss {
			continue
		}
		if int(ss.maxPrio.Load()) < priority || ss.deliveryRoom() <= 0 {
			return false
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if ss.closing || ss.inflight == nil {
			return false
		}
		if _, dup := ss.inflight[messageID]; dup {
			return false
		}
		k := delivery.Key{MessageID: messageID, MemberID: ss.memberID}
		if _, done := e.taken[k]; done {
			return false
		}
		e.taken[k] = time.Now()
		ss.inflight[messageID] = struct{}{}
		return true
	}
	return false
}

// pick chooses the session a member's claim goes to: the one accepting
// the most priorities, then the one with the most queue room.
func (lm *localMember) pick() *session {
	var best *session
	bestFree := 0
	for _, ss := range lm.sessions {
		if ss.isClosing() {
			continue
		}
		free := ss.q.free()
		if best == nil || ss.maxPrio.Load() > best.maxPrio.Load() ||
			(ss.maxPrio.Load() == best.maxPrio.Load() && free > bestFree) {
			best, bestFree = ss, free
		}
	}
	return best
}

func (e *engine) run(ctx context.Context) {
	sweep := time.NewTicker(e.s.cfg.SweepInterval)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			e.pruneTaken(time.Now().Add(-takenTTL))
			e.wakeAll(reasonSweep)
		case <-e.signal:
			e.claimRound(ctx)
		}
	}
}

type claimTarget struct {
	ss     *session
	reason claimReason
	limit  int32
	got    int32
	// held are rows claimed after one the session's queue refused: they go
	// back to the queue unpushed, so as not to overtake it.
	refused bool
	held    []delivery.Key
}

// claimRound claims for every dirty member in one statement per chunk.
func (e *engine) claimRound(ctx context.Context) {
	s := e.s
	targets := map[string]*claimTarget{}
	var reqs []delivery.ClaimRequest
	e.mu.Lock()
	for id, lm := range e.members {
		if lm.dirty == 0 || lm.inflight || lm.releasing > 0 {
			continue
		}
		ss := lm.pick()
		if ss == nil {
			lm.dirty = 0
			continue
		}
		// Leave room in the queue for acks and replies.
		limit := min(claimLimit, ss.deliveryRoom())
		if limit <= 0 {
			ss.starved.Store(true) // the write loop kicks us when it drains
			continue
		}
		targets[id] = &claimTarget{ss: ss, reason: lm.dirty, limit: int32(limit)}
		reqs = append(reqs, delivery.ClaimRequest{MemberID: id, Conn: ss.id, MaxPriority: int16(ss.maxPrio.Load()), Limit: int32(limit)})
		lm.dirty, lm.inflight = 0, true
	}
	e.mu.Unlock()
	if len(reqs) == 0 {
		return
	}
	failed := false
	const chunk = 2000
	for i := 0; i < len(reqs); i += chunk {
		part := reqs[i:min(i+chunk, len(reqs))]
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rows, err := s.store.Claim(cctx, &delivery.ClaimParams{Node: s.leaseNode, Lease: s.cfg.LeaseDuration, Requests: part})
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				s.logger.Warn("claim failed; will retry", "err", err, "members", len(part))
			}
			failed = true
			e.mu.Lock()
			for _, r := range reqs[i:] {
				if lm := e.members[r.MemberID]; lm != nil {
					lm.dirty |= targets[r.MemberID].reason
				}
			}
			e.mu.Unlock()
			break
		}
		now := time.Now()
		for _, d := range rows {
			t := targets[d.MemberID]
			t.got++
			if d.PrevConn != "" && d.Attempts == 1 &&
				!e.take(delivery.Key{MessageID: d.MessageID, MemberID: d.MemberID}, now) {
				// Straight from a remote fast-path lease, and its envelope
				// already pushed it. Its lease now names t.ss; the session
				// holding it acks it by key, or, closing without an ack,
				// leaves it to expire.
				continue
			}
			s.m.Claims.WithLabelValues(t.reason.label()).Inc()
			if t.reason&^(reasonBacklog|reasonSweep) == 0 {
				via := "sweep"
				if t.reason&reasonBacklog != 0 {
					via = "backlog"
				}
				s.m.Recovered.WithLabelValues(via).Inc()
			}
			if t.refused {
				t.held = append(t.held, delivery.Key{MessageID: d.MessageID, MemberID: d.MemberID})
				continue
			}
			t.refused = !t.ss.pushEnvelope(d, d.CreatedAt)
		}
	}
	for id, t := range targets {
		if len(t.held) > 0 {
			s.releaseLeases(t.ss.id, t.ss.meshID, id, t.held)
		}
	}
	more := false
	e.mu.Lock()
	for id, t := range targets {
		lm := e.members[id]
		if lm == nil {
			continue
		}
		lm.inflight = false
		if t.got >= t.limit {
			lm.dirty |= reasonMore
			more = true
		}
		if len(lm.sessions) == 0 && lm.releasing == 0 {
			delete(e.members, id)
		}
	}
	e.mu.Unlock()
	if failed {
		// Postgres trouble: back off before the next attempt.
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
		e.kick()
		return
	}
	if more {
		e.kick()
	}
}

// pushEnvelope queues a claimed (or fast-path) row on the session. A row
// that cannot be queued goes back to the queue: it is claimed again, in
// order, once the writer has made room. A full queue alone does not make
// a slow consumer: one that stops reading is closed by the write timeout.
func (ss *session) pushEnvelope(d delivery.Delivery, committed time.Time) bool {
	s := ss.s
	ss.mu.Lock()
	if ss.closing || ss.inflight == nil {
		ss.mu.Unlock()
		s.releaseLeases(d.Conn, d.MeshID, d.MemberID, []delivery.Key{{MessageID: d.MessageID, MemberID: d.MemberID}})
		return false
	}
	if _, dup := ss.inflight[d.MessageID]; dup {
		// Already queued or awaiting its client_ack on this session (its
		// lease was released and claimed again): pushing twice would only
		// make the client drop a duplicate.
		ss.mu.Unlock()
		return true
	}
	ss.inflight[d.MessageID] = struct{}{}
	ss.mu.Unlock()
	return ss.pushReserved(d, committed)
}

// pushReserved queues a row already entered in the session's inflight set.
func (ss *session) pushReserved(d delivery.Delivery, committed time.Time) bool {
	s := ss.s
	if s.acks.unmarkedHas(d.MessageID, d.MemberID) {
		// Acked (or written without client_ack) and about to be marked
		// delivered: a claim that raced the mark must not push it again.
		ss.mu.Lock()
		if ss.inflight != nil {
			delete(ss.inflight, d.MessageID)
		}
		ss.mu.Unlock()
		return true
	}
	fields := protocol.PushFields{
		MessageID: d.MessageID, MeshID: d.MeshID, SenderPubkey: d.SenderPubkey,
		Priority: protocol.PriorityName(int(d.Priority)), Nonce: d.Nonce, Ciphertext: d.Ciphertext,
		CreatedAt: d.CreatedAt, SenderMemberID: d.SenderMemberID, SenderName: d.SenderName,
		TargetSpec: d.TargetSpec, ClientMessageID: d.ClientMessageID,
	}
	data := protocol.AppendPush(make([]byte, 0, 400+len(d.Nonce)+len(d.Ciphertext)+len(d.SenderName)), &fields)
	meta := &pushMeta{key: delivery.Key{MessageID: d.MessageID, MemberID: d.MemberID},
		committed: committed, priority: protocol.PriorityName(int(d.Priority))}
	if ss.q.pushUpTo(frame{data: data, push: meta}, ss.q.max-ss.reserve, ss.pushByteLimit()) {
		ss.kickWriter()
		return true
	}
	ss.mu.Lock()
	if ss.inflight != nil {
		delete(ss.inflight, d.MessageID)
	}
	ss.mu.Unlock()
	// Until the row is claimed again no newer one may take the fast path;
	// the writer asks for a claim once it has made room.
	ss.starved.Store(true)
	s.releaseLeases(d.Conn, d.MeshID, d.MemberID, []delivery.Key{meta.key})
	return false
}

// releaseLeases gives rows back and wakes the member's other sessions, here
// and on other nodes.
// Until the release has committed the member takes no claim and no fast
// path (engine.beginRelease), so nothing newer overtakes the released rows.
func (s *Server) releaseLeases(conn, mesh, member string, keys []delivery.Key) {
	s.engine.beginRelease(member)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer s.engine.endRelease(member)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := s.store.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: conn, Keys: keys}); err != nil {
			// The leases run out by themselves; the sweep then redelivers.
			s.logger.Warn("release leases failed; they will expire", "err", err, "rows", len(keys))
			var re *store.RowsError
			if !errors.As(err, &re) {
				return
			}
			s.m.BatchRowsFailed.WithLabelValues("release").Add(float64(re.Refused()))
		}
		if _, elsewhere := s.replica.MemberPresent(member); elsewhere {
			s.notifier.Notify(mesh, []string{member})
		}
	}()
}

// releaseNodeLeases releases the leases of dead node incarnations.
func (s *Server) releaseNodeLeases(ctx context.Context, pattern, keep string) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	refs, err := s.store.ReleaseNodeLeases(cctx, &delivery.ReleaseNodeParams{Pattern: pattern, Keep: keep})
	if err != nil {
		if ctx.Err() == nil {
			s.logger.Warn("release node leases failed; they will expire", "pattern", pattern, "err", err)
		}
		return
	}
	if len(refs) == 0 {
		return
	}
	s.logger.Info("released leases of a departed node", "pattern", pattern, "members", len(refs))
	members := make([]string, 0, len(refs))
	for _, r := range refs {
		members = append(members, r.MemberID)
		if _, elsewhere := s.replica.MemberPresent(r.MemberID); elsewhere {
			s.notifier.Notify(r.MeshID, []string{r.MemberID})
		}
	}
	s.engine.wake(members, reasonRelease)
}

// acker marks delivered rows in batches: client_acks, and pushes written
// to sessions without client_ack.
type acker struct {
	s       *Server
	mu      sync.Mutex
	pending []ackItem
	// unmarked holds every key queued or being written, until its mark has
	// committed: claims skip them.
	unmarked map[delivery.Key]int
	signal   chan struct{}
}

type ackItem struct {
	key  delivery.Key
	mesh string
}

// maxPendingAcks bounds the acks kept while Postgres is down.
const maxPendingAcks = 1 << 20

func newAcker(s *Server) *acker {
	return &acker{s: s, signal: make(chan struct{}, 1), unmarked: map[delivery.Key]int{}}
}

// unmarkedHas reports whether a row is acked but not yet marked delivered.
func (a *acker) unmarkedHas(messageID int64, member string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.unmarked[delivery.Key{MessageID: messageID, MemberID: member}] > 0
}

// add queues rows of one mesh to mark delivered.
func (a *acker) add(mesh string, keys ...delivery.Key) {
	a.mu.Lock()
	if len(a.pending)+len(keys) <= maxPendingAcks {
		for _, k := range keys {
			a.pending = append(a.pending, ackItem{key: k, mesh: mesh})
			a.unmarked[k]++
		}
	}
	a.mu.Unlock()
	select {
	case a.signal <- struct{}{}:
	default:
	}
}

// ackLinger lets marks accumulate before a flush: the push is already on
// the wire, so a few milliseconds cost nothing visible, and at moderate
// rates they turn one small transaction per push into one per batch.
const ackLinger = 5 * time.Millisecond

func (a *acker) run(ctx context.Context) {
	linger := time.NewTimer(ackLinger)
	linger.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.signal:
		}
		linger.Reset(ackLinger)
		select {
		case <-ctx.Done():
			return
		case <-linger.C:
		}
		for a.flush(ctx) {
		}
	}
}

// flush writes one batch and reports whether more is pending.
func (a *acker) flush(ctx context.Context) bool {
	a.mu.Lock()
	n := min(len(a.pending), 4096)
	if n == 0 {
		a.mu.Unlock()
		return false
	}
	batch := make([]ackItem, n)
	copy(batch, a.pending)
	a.pending = a.pending[n:]
	if len(a.pending) == 0 {
		a.pending = nil
	}
	a.mu.Unlock()
	s := a.s
	keys := make([]delivery.Key, n)
	meshOf := make(map[string]string, n) // member → mesh
	for i, it := range batch {
		keys[i] = it.key
		meshOf[it.key.MemberID] = it.mesh
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	done, err := s.store.MarkDelivered(cctx, &delivery.MarkParams{Keys: keys})
	cancel()
	var re *store.RowsError
	if errors.As(err, &re) {
		// Keys Postgres refused can never be marked: they are dropped (a
		// lease on such a row runs out by itself). Keys that failed because
		// Postgres went away meanwhile are queued again.
		err = nil
		s.m.BatchRowsFailed.WithLabelValues("mark").Add(float64(re.Refused()))
		s.logger.Warn("delivery marks refused by Postgres; the rest were written", "err", re)
		var again []ackItem
		settled := keys[:0:0]
		for i, e := range re.Errs {
			if e != nil && !store.IsDataError(e) {
				again = append(again, batch[i])
			} else {
				settled = append(settled, keys[i])
			}
		}
		keys = settled
		if len(again) > 0 {
			a.mu.Lock()
			a.pending = append(again, a.pending...)
			a.mu.Unlock()
		}
	}
	if err != nil {
		a.mu.Lock()
		a.pending = append(batch, a.pending...)
		a.mu.Unlock()
		if ctx.Err() == nil {
			s.logger.Warn("marking deliveries failed; will retry", "err", err, "rows", len(batch))
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
		return ctx.Err() == nil
	}
	a.mu.Lock()
	for _, k := range keys {
		if a.unmarked[k]--; a.unmarked[k] <= 0 {
			delete(a.unmarked, k)
		}
	}
	a.mu.Unlock()
	s.m.MessagesDelivered.Add(float64(len(done)))
	// One audit event per recipient and batch, listing its messages.
	byMember := map[string][]int64{}
	for _, d := range done {
		byMember[d.MemberID] = append(byMember[d.MemberID], d.MessageID)
	}
	for member, ids := range byMember {
		s.audit.MessagesDelivered(meshOf[member], member, ids)
	}
	return true
}

// flushNow writes every pending ack (used at shutdown).
func (a *acker) flushNow(ctx context.Context) {
	for ctx.Err() == nil {
		a.mu.Lock()
		n := len(a.pending)
		a.mu.Unlock()
		if n == 0 {
			return
		}
		if !a.flush(ctx) {
			return
		}
	}
}
