package presence

import (
	"sort"
	"sync"
	"time"
)

// Change describes one entry's transition, for observers. Prev is nil when
// the entry was not present before; Cur.State is Gone when it left.
// IsLive/InGrace on Prev and Cur tell joins, leaves and grace.
type Change struct {
	Prev *Entry
	Cur  *Entry
}

// Replica is a node's copy of every presence entry in the cluster. The
// node's own entries are authoritative; the rest are replicas merged by
// (epoch, version). It is safe for concurrent use.
type Replica struct {
	self  string
	inc   int64
	grace time.Duration
	now   func() time.Time

	mu       sync.RWMutex
	clock    uint64
	entries  map[string]*Entry            // by presence id, tombstones included
	goneAt   map[string]int64             // tombstone id → when it became gone (local ms)
	bySess   map[string]map[string]*Entry // session key → present entries
	byMesh   map[string]map[string]*Entry // mesh → present entries
	byMember map[string]map[string]*Entry // member → present entries
	alive    map[string]int64             // live node name → incarnation
	present  int                          // present entries (live and grace)
	visible  map[string]int               // mesh → visible live entries (the capacity count)

	onChange func([]Change) // called without the lock held
	onOwn    func([]Entry)  // own entries to replicate; called without the lock

	// maxPerMember bounds the present entries one owner holds for one
	// member (0: no bound); onDrop counts entries refused by it. Set
	// before use.
	maxPerMember int
	onDrop       func(reason string)
}

// tombstoneTTL is how long a deleted entry is remembered, so that stale
// copies arriving through anti-entropy cannot resurrect it.
const tombstoneTTL = 10 * time.Minute

// maxTombstones bounds the tombstones kept (about 200 bytes each). Churn
// beyond it forgets the oldest early: a stale copy of one could then come
// back until its owner's next push-pull, which lists only present entries,
// deletes it again.
const maxTombstones = 50000

// NewReplica creates a replica for node self with incarnation inc.
func NewReplica(self string, inc int64, grace time.Duration) *Replica {
	r := &Replica{
		self: self, inc: inc, grace: grace, now: time.Now,
		entries:  map[string]*Entry{},
		goneAt:   map[string]int64{},
		bySess:   map[string]map[string]*Entry{},
		byMesh:   map[string]map[string]*Entry{},
		byMember: map[string]map[string]*Entry{},
		alive:    map[string]int64{self: inc},
		visible:  map[string]int{},
	}
	return r
}

// Self is the owning node's name.
func (r *Replica) Self() string { return r.self }

// Incarnation is the owning node's incarnation.
func (r *Replica) Incarnation() int64 { return r.inc }

// SetLimits bounds the present entries one node may hold for one member
// (MAX_SESSIONS_PER_MEMBER: every owner enforces it on its own hellos, so
// only a faulty or hostile node sends more); onDrop is called for each
// entry refused. Call before use.
func (r *Replica) SetLimits(maxPerMember int, onDrop func(reason string)) {
	r.maxPerMember, r.onDrop = maxPerMember, onDrop
}

// SetObservers sets the change callback and the callback that receives the
// node's own changed entries for replication. Call before use.
func (r *Replica) SetObservers(onChange func([]Change), onOwn func([]Entry)) {
	r.onChange, r.onOwn = onChange, onOwn
}

func sessKey(mesh, member, session string) string { return mesh + "\x00" + member + "\x00" + session }

func (e *Entry) sessKey() string { return sessKey(e.MeshID, e.MemberID, e.SessionID) }

func addIdx(m map[string]map[string]*Entry, k string, e *Entry) {
	s := m[k]
	if s == nil {
		s = map[string]*Entry{}
		m[k] = s
	}
	s[e.PresenceID] = e
}

func delIdx(m map[string]map[string]*Entry, k, id string) {
	if s := m[k]; s != nil {
		delete(s, id)
		if len(s) == 0 {
			delete(m, k)
		}
	}
}

// account adds d to the counters e contributes to. Callers hold the write
// lock and call it with -1 before changing a stored entry, +1 after.
func (r *Replica) account(e *Entry, d int) {
	if !e.Present() {
		return
	}
	r.present += d
	if e.Visible() {
		if r.visible[e.MeshID] += d; r.visible[e.MeshID] <= 0 {
			delete(r.visible, e.MeshID)
		}
	}
}

// put stores e (replacing any entry with its id) and maintains indexes and
// counters; a tombstone is stored stripped (tombstone), e itself is left
// whole for observers. Callers hold the write lock.
func (r *Replica) put(e *Entry) *Entry {
	prev := r.entries[e.PresenceID]
	if prev != nil {
		r.account(prev, -1)
	}
	r.account(e, 1)
	if prev != nil && prev.Present() {
		delIdx(r.bySess, prev.sessKey(), prev.PresenceID)
		delIdx(r.byMesh, prev.MeshID, prev.PresenceID)
		delIdx(r.byMember, prev.MemberID, prev.PresenceID)
	}
	if e.Present() {
		r.entries[e.PresenceID] = e
		delete(r.goneAt, e.PresenceID)
		addIdx(r.bySess, e.sessKey(), e)
		addIdx(r.byMesh, e.MeshID, e)
		addIdx(r.byMember, e.MemberID, e)
	} else {
		t := tombstone(*e)
		r.entries[e.PresenceID] = &t
		if _, ok := r.goneAt[e.PresenceID]; !ok {
			r.goneAt[e.PresenceID] = r.now().UnixMilli()
		}
	}
	if prev != nil && !prev.Present() {
		prev = nil // a tombstone is "not present" for observers
	}
	return prev
}

func (r *Replica) tick(v uint64) {
	if v > r.clock {
		r.clock = v
	}
}

// markOrphan applies what the replica knows about the owner's liveness.
func (r *Replica) markOrphan(e *Entry) {
	if e.Owner == r.self && e.OwnerInc == r.inc {
		e.orphaned = false
		return
	}
	inc, ok := r.alive[e.Owner]
	if ok && inc == e.OwnerInc {
		e.orphaned = false
		return
	}
	if !e.orphaned {
		e.orphaned = true
		e.orphanUntil = r.now().Add(r.grace).UnixMilli()
	}
}

func (r *Replica) notify(changes []Change, own []Entry) {
	if len(changes) > 0 && r.onChange != nil {
		r.onChange(changes)
	}
	if len(own) > 0 && r.onOwn != nil {
		r.onOwn(own)
	}
}

// Create adds a live entry owned by this node. The epoch is above every
// version this node has seen, so a takeover of an existing presence id
// wins over the previous owner's entry.
func (r *Replica) Create(e Entry) Entry {
	bound(&e)
	r.mu.Lock()
	r.clock++
	e.Owner, e.OwnerInc = r.self, r.inc
	e.Epoch, e.Version = r.clock, r.clock
	e.State, e.GraceUntil = Live, 0
	e.orphaned = false
	stored := e
	prev := r.put(&stored)
	out := stored
	r.mu.Unlock()
	r.notify([]Change{{Prev: prev, Cur: &out}}, []Entry{out})
	return out
}

// Update changes an entry this node owns. fn edits a copy and returns
// whether it changed anything worth replicating. It reports false when the
// entry is not present, not ours, or fn made no change.
func (r *Replica) Update(id string, fn func(*Entry) bool) (Entry, bool) {
	r.mu.Lock()
	cur := r.entries[id]
	if cur == nil || !cur.Present() || cur.Owner != r.self || cur.OwnerInc != r.inc {
		r.mu.Unlock()
		return Entry{}, false
	}
	next := *cur
	if !fn(&next) {
		// Keep local-only edits (such as a refreshed status timestamp).
		r.account(cur, -1)
		*cur = next
		r.account(cur, 1)
		r.mu.Unlock()
		return next, false
	}
	bound(&next)
	r.clock++
	next.Version = r.clock
	prev := r.put(&next)
	out := next
	r.mu.Unlock()
	r.notify([]Change{{Prev: prev, Cur: &out}}, []Entry{out})
	return out, true
}

// Disconnect moves this node's entry to grace if connID still owns it (the
// session was not taken over by a newer connection). An ephemeral
// session (a CLI command, with a fresh session id each time) goes at once:
// nobody reattaches to it, and a grace entry per command would let one
// member's scripted commands fill every node's replica and its own
// MAX_SESSIONS_PER_MEMBER.
func (r *Replica) Disconnect(id, connID string) (Entry, bool) {
	until := r.now().Add(r.grace).UnixMilli()
	return r.Update(id, func(e *Entry) bool {
		if e.ConnID != connID || e.State != Live {
			return false
		}
		if e.Ephemeral {
			e.State = Gone
			return true
		}
		e.State, e.GraceUntil = Grace, until
		return true
	})
}

// Remove deletes this node's entry (a tombstone is replicated).
func (r *Replica) Remove(id string) (Entry, bool) {
	return r.Update(id, func(e *Entry) bool {
		e.State = Gone
		return true
	})
}

// Apply merges entries received from other nodes, keeping the newest of
// each. Entries of this node's current incarnation are authoritative here:
// an unknown one is a stale copy of something already deleted, and is
// answered with a fresh tombstone.
func (r *Replica) Apply(in []Entry) {
	var changes []Change
	var own []Entry
	var dropped []string
	r.mu.Lock()
	for i := range in {
		e := in[i]
		r.tick(e.Epoch)
		r.tick(e.Version)
		cur := r.entries[e.PresenceID]
		if e.Owner == r.self && e.OwnerInc == r.inc {
			if cur == nil && e.State != Gone {
				r.clock++
				e.State, e.Version = Gone, r.clock
				r.put(&e)
				own = append(own, e)
			}
			continue
		}
		if cur != nil && !e.newer(cur) {
			continue
		}
		if e.Present() && r.maxPerMember > 0 && r.ownerHolds(e.Owner, e.OwnerInc, e.MemberID, e.PresenceID) >= r.maxPerMember {
			dropped = append(dropped, dropOverCap)
			continue
		}
		r.markOrphan(&e)
		stored := e
		prev := r.put(&stored)
		if prev == nil && !stored.Present() {
			continue // a tombstone for something we never saw
		}
		out := stored
		if !out.Present() && prev != nil {
			// Tombstones travel stripped: observers see the session that
			// left, as it was.
			out = *prev
			out.State, out.Epoch, out.Version, out.GraceUntil = Gone, stored.Epoch, stored.Version, 0
		}
		changes = append(changes, Change{Prev: prev, Cur: &out})
	}
	r.mu.Unlock()
	for _, reason := range dropped {
		if r.onDrop != nil {
			r.onDrop(reason)
		}
	}
	r.notify(changes, own)
}

// ownerHolds counts the present entries of member held by one node
// incarnation, other than id. Callers hold the lock.
func (r *Replica) ownerHolds(owner string, inc int64, member, id string) int {
	n := 0
	for _, x := range r.byMember[member] {
		if x.Owner == owner && x.OwnerInc == inc && x.PresenceID != id {
			n++
		}
	}
	return n
}

// Snapshot returns the Lamport clock and every entry (tombstones included)
// for a push-pull exchange.
func (r *Replica) Snapshot() (uint64, []Entry) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Entry, 0, len(r.entries))
	for _, e := range r.entries {
		out = append(out, *e)
	}
	return r.clock, out
}

// MergeSnapshot merges another node's snapshot. That node is authoritative
// for its own entries: one of ours that it owns, that it no longer lists
// and that is older than its clock was deleted there.
func (r *Replica) MergeSnapshot(from string, fromInc int64, clock uint64, entries []Entry) {
	r.Apply(entries)
	if from == r.self && fromInc == r.inc {
		// Only this node speaks for its own entries: a snapshot claiming
		// to come from it is forged or corrupt, and must not delete them.
		return
	}
	listed := make(map[string]struct{}, len(entries))
	for _, e := range entries {
		listed[e.PresenceID] = struct{}{}
	}
	var changes []Change
	r.mu.Lock()
	for id, e := range r.entries {
		if e.Owner != from || e.OwnerInc != fromInc || !e.Present() || e.Version > clock {
			continue
		}
		if _, ok := listed[id]; ok {
			continue
		}
		gone := *e
		gone.State = Gone
		prev := r.put(&gone)
		out := gone
		changes = append(changes, Change{Prev: prev, Cur: &out})
	}
	r.mu.Unlock()
	r.notify(changes, nil)
}

// NodeAlive records that node name (incarnation inc) is up: its entries of
// that incarnation are no longer orphans.
func (r *Replica) NodeAlive(name string, inc int64) {
	var changes []Change
	r.mu.Lock()
	r.alive[name] = inc
	for _, e := range r.entries {
		if e.Owner != name || !e.Present() {
			continue
		}
		wasLive := e.IsLive()
		before := *e
		r.account(e, -1)
		r.markOrphan(e)
		r.account(e, 1)
		if e.IsLive() != wasLive {
			cur := *e
			changes = append(changes, Change{Prev: &before, Cur: &cur})
		}
	}
	r.mu.Unlock()
	r.notify(changes, nil)
}

// NodeDead records that node name left or failed: its sessions go to grace
// here and leave when the grace period ends unless they reattach.
func (r *Replica) NodeDead(name string) {
	if name == r.self {
		return
	}
	var changes []Change
	r.mu.Lock()
	delete(r.alive, name)
	for _, e := range r.entries {
		if e.Owner != name || !e.Present() || e.orphaned {
			continue
		}
		before := *e
		r.account(e, -1)
		r.markOrphan(e)
		if e.Ephemeral {
			// Nobody reattaches to a one-shot command: it should not hold
			// a place in MAX_SESSIONS_PER_MEMBER for the grace period.
			e.orphanUntil = r.now().UnixMilli()
		}
		r.account(e, 1)
		cur := *e
		changes = append(changes, Change{Prev: &before, Cur: &cur})
	}
	r.mu.Unlock()
	r.notify(changes, nil)
}

// Expire ends grace periods that ran out and forgets old tombstones. Own
// entries get a replicated tombstone; others are dropped locally (their
// owner, or every node for a dead owner, does the same).
func (r *Replica) Expire() {
	now := r.now().UnixMilli()
	var changes []Change
	var own []Entry
	r.mu.Lock()
	if len(r.goneAt) > maxTombstones {
		r.forgetOldestTombstones(len(r.goneAt) - maxTombstones*9/10)
	}
	for id, e := range r.entries {
		if !e.Present() {
			if now-r.goneAt[id] > tombstoneTTL.Milliseconds() {
				delete(r.entries, id)
				delete(r.goneAt, id)
			}
			continue
		}
		expired := (e.State == Grace && e.GraceUntil <= now) || (e.orphaned && e.orphanUntil <= now)
		if !expired {
			continue
		}
		gone := *e
		gone.State = Gone
		if e.Owner == r.self && e.OwnerInc == r.inc {
			r.clock++
			gone.Version = r.clock
			own = append(own, gone)
		}
		prev := r.put(&gone)
		out := gone
		changes = append(changes, Change{Prev: prev, Cur: &out})
	}
	r.mu.Unlock()
	r.notify(changes, own)
}

// forgetOldestTombstones drops the n oldest tombstones. Callers hold the
// write lock.
func (r *Replica) forgetOldestTombstones(n int) {
	type aged struct {
		id string
		at int64
	}
	all := make([]aged, 0, len(r.goneAt))
	for id, at := range r.goneAt {
		all = append(all, aged{id, at})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at < all[j].at })
	for _, a := range all[:min(n, len(all))] {
		delete(r.entries, a.id)
		delete(r.goneAt, a.id)
	}
}

// MemberSessions counts a member's present sessions cluster-wide: live and
// in grace, ephemeral ones included (MAX_SESSIONS_PER_MEMBER).
func (r *Replica) MemberSessions(member string) int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.byMember[member])
}

// Owns reports whether this node incarnation owns the present entry id.
func (r *Replica) Owns(id string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	e := r.entries[id]
	return e != nil && e.Present() && e.Owner == r.self && e.OwnerInc == r.inc
}

// OwnSnapshot returns the Lamport clock and this node's present entries:
// the state it sends in a push-pull. Every node speaks only for its own
// entries, and an entry it no longer lists is one it deleted.
func (r *Replica) OwnSnapshot() (uint64, []Entry) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []Entry
	for _, e := range r.entries {
		if e.Owner == r.self && e.OwnerInc == r.inc && e.Present() {
			out = append(out, *e)
		}
	}
	return r.clock, out
}

// OwnEntries returns the current state of this node's entries ids,
// tombstones included; ids it does not hold (any more) are left out.
func (r *Replica) OwnEntries(ids []string) []Entry {
	if len(ids) == 0 {
		return nil
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Entry, 0, len(ids))
	for _, id := range ids {
		if e := r.entries[id]; e != nil && e.Owner == r.self && e.OwnerInc == r.inc {
			out = append(out, *e)
		}
	}
	return out
}

// Get returns an entry by presence id (tombstones excluded).
func (r *Replica) Get(id string) (Entry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	e := r.entries[id]
	if e == nil || !e.Present() {
		return Entry{}, false
	}
	return *e, true
}

// FindSession returns the newest present entry of (mesh, member, session).
func (r *Replica) FindSession(mesh, member, session string) (Entry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var best *Entry
	for _, e := range r.bySess[sessKey(mesh, member, session)] {
		if best == nil || e.newer(best) {
			best = e
		}
	}
	if best == nil {
		return Entry{}, false
	}
	return *best, true
}

// Live returns the visible live sessions of a mesh (ephemeral ones are
// left out), ordered by connection time.
func (r *Replica) Live(mesh string) []Entry {
	r.mu.RLock()
	out := make([]Entry, 0, len(r.byMesh[mesh]))
	for _, e := range r.byMesh[mesh] {
		if e.Visible() {
			out = append(out, *e)
		}
	}
	r.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].ConnectedAt != out[j].ConnectedAt {
			return out[i].ConnectedAt < out[j].ConnectedAt
		}
		return out[i].PresenceID < out[j].PresenceID
	})
	return out
}

// CountLive counts a mesh's visible live sessions (the connection cap
// does not count ephemeral ones).
func (r *Replica) CountLive(mesh string) int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.visible[mesh]
}

// MemberEntries returns a member's present entries (live and grace).
func (r *Replica) MemberEntries(member string) []Entry {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Entry, 0, len(r.byMember[member]))
	for _, e := range r.byMember[member] {
		out = append(out, *e)
	}
	return out
}

// MemberOnline reports whether a member has a visible live session on any
// node (send-only and ephemeral connections are not someone to talk to).
func (r *Replica) MemberOnline(member string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, e := range r.byMember[member] {
		if e.Visible() {
			return true
		}
	}
	return false
}

// SoleRemoteSession returns a member's session when it is the member's
// only present session that receives messages, live, and hosted by another
// node.
func (r *Replica) SoleRemoteSession(member string) (Entry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var sole *Entry
	for _, e := range r.byMember[member] {
		if !e.Receives() {
			continue // a send-only connection is not a place to deliver
		}
		if sole != nil {
			return Entry{}, false
		}
		sole = e
	}
	if sole != nil && sole.IsLive() && (sole.Owner != r.self || sole.OwnerInc != r.inc) {
		return *sole, true
	}
	return Entry{}, false
}

// MemberPresent reports whether a member has any live or grace session that
// receives messages, and whether one of them is hosted by a node other
// than this one.
func (r *Replica) MemberPresent(member string) (present, remote bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, e := range r.byMember[member] {
		if !e.Receives() {
			continue
		}
		present = true
		if e.Owner != r.self || e.OwnerInc != r.inc {
			remote = true
		}
	}
	return present, remote
}

// GroupMembers returns the members of a mesh with a live session in group.
func (r *Replica) GroupMembers(mesh, group string) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	seen := map[string]struct{}{}
	var out []string
	for _, e := range r.byMesh[mesh] {
		if !e.Visible() || !e.HasGroup(group) {
			continue
		}
		if _, ok := seen[e.MemberID]; !ok {
			seen[e.MemberID] = struct{}{}
			out = append(out, e.MemberID)
		}
	}
	sort.Strings(out)
	return out
}

// Find returns live entries matching pred.
func (r *Replica) Find(pred func(*Entry) bool) []Entry {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []Entry
	for _, e := range r.entries {
		if e.IsLive() && pred(e) {
			out = append(out, *e)
		}
	}
	return out
}

// Own returns this node's present entries.
func (r *Replica) Own() []Entry {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []Entry
	for _, e := range r.entries {
		if e.Owner == r.self && e.OwnerInc == r.inc && e.Present() {
			out = append(out, *e)
		}
	}
	return out
}

// Len counts present entries (live and grace).
func (r *Replica) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.present
}

// Meshes returns the ids of meshes with present entries.
func (r *Replica) Meshes() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(r.byMesh))
	for m := range r.byMesh {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}
