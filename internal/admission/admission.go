// Package admission keeps the bookkeeping of a node's connection caps:
// open and hello-less WebSockets per client address (Addrs), and the
// places of hellos between the session caps' check and their session's
// presence (Slots).
package admission

import "sync"

// Addrs counts open WebSockets by client address key, and of those the
// ones without a hello yet. Entries exist only while an address has open
// sockets and are deleted at zero.
type Addrs struct {
	maxOpen, maxPending int

	mu      sync.Mutex
	open    map[string]int
	pending map[string]int
}

// NewAddrs makes the counts for MAX_CONNECTIONS_PER_ADDR (maxOpen) and
// MAX_PENDING_CONNECTIONS_PER_ADDR (maxPending).
func NewAddrs(maxOpen, maxPending int) *Addrs {
	return &Addrs{maxOpen: maxOpen, maxPending: maxPending, open: map[string]int{}, pending: map[string]int{}}
}

// Admit counts a new WebSocket of the client address key, or reports why
// it is refused: the address has maxOpen open, or maxPending that have
// not said hello yet (idle sockets must not fill the first cap for
// everyone behind the address).
func (a *Addrs) Admit(key string) (refused string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.open[key] >= a.maxOpen:
		return "too many connections from this address"
	case a.pending[key] >= a.maxPending:
		return "too many connections from this address waiting for their hello"
	}
	a.open[key]++
	a.pending[key]++
	return ""
}

// Authed moves a socket of key from pending to authenticated.
func (a *Addrs) Authed(key string) {
	a.mu.Lock()
	decr(a.pending, key)
	a.mu.Unlock()
}

// Release forgets a closed socket of key; authed says whether it had
// said hello (Authed was called).
func (a *Addrs) Release(key string, authed bool) {
	a.mu.Lock()
	decr(a.open, key)
	if !authed {
		decr(a.pending, key)
	}
	a.mu.Unlock()
}

func decr(m map[string]int, key string) {
	if m[key]--; m[key] <= 0 {
		delete(m, key)
	}
}

// Counts are the sessions the presence replica knows, cluster-wide
// (presence.Replica).
type Counts interface {
	// CountLive counts a mesh's live visible sessions.
	CountLive(meshID string) int
	// MemberSessions counts a member's present sessions, live or in grace.
	MemberSessions(memberID string) int
}

// Slots are the places of hellos that passed the session caps and are
// between that check and register (the hello's database round trip):
// counted by member and by mesh, so that concurrent hellos cannot all take
// one free place. Entries exist only while such hellos are in flight
// (bounded by the open connections) and are deleted at zero.
//
// The reservation is local: hellos racing on different nodes are held
// back only once each node's sessions reach the others through gossip, so
// the cluster-wide caps are best effort by up to one gossip round.
type Slots struct {
	counts             Counts
	perMesh, perMember int
	mu                 sync.Mutex
	member, mesh       map[string]int
}

// NewSlots makes the reservations for MAX_CONNECTIONS_PER_MESH (perMesh)
// and MAX_SESSIONS_PER_MEMBER (perMember) over the replica's counts.
func NewSlots(counts Counts, perMesh, perMember int) *Slots {
	return &Slots{counts: counts, perMesh: perMesh, perMember: perMember, member: map[string]int{}, mesh: map[string]int{}}
}

// Reserve checks MAX_CONNECTIONS_PER_MESH (when meshCapped: not for
// ephemeral or send-only sessions) and MAX_SESSIONS_PER_MEMBER (present
// sessions cluster-wide, live or in grace, ephemeral included) for a hello,
// counting the hellos in flight on this node. If it fits, its place is
// held until release is called (once the session's presence exists, or
// the hello failed); otherwise reason is the capacity rejection's detail.
// A session taking over its own presence (reattach or replacement) adds
// none: visiblePrev says whether the entry it replaces counts as live.
func (sl *Slots) Reserve(meshID, memberID string, meshCapped, reattach, visiblePrev bool) (release func(), reason string, ok bool) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if meshCapped {
		live := sl.counts.CountLive(meshID) + sl.mesh[meshID]
		if visiblePrev {
			live-- // the replaced session frees its slot
		}
		if live >= sl.perMesh {
			return nil, "", false
		}
	}
	n := sl.counts.MemberSessions(memberID) + sl.member[memberID]
	if reattach {
		n--
	}
	if n >= sl.perMember {
		return nil, "sessions per member", false
	}
	countMesh := meshCapped && !visiblePrev
	if !reattach {
		sl.member[memberID]++
	}
	if countMesh {
		sl.mesh[meshID]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			sl.mu.Lock()
			defer sl.mu.Unlock()
			if !reattach {
				decr(sl.member, memberID)
			}
			if countMesh {
				decr(sl.mesh, meshID)
			}
		})
	}, "", true
}
