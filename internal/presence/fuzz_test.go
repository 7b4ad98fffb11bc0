package presence

import (
	"encoding/json"
	"math"
	"testing"
	"time"
)

const (
	fuzzSelf = "self"
	fuzzInc  = int64(7)
)

// fuzzReplica returns a replica holding one live entry of its own and one
// of a live remote node, and the delegate memberlist would call with
// gossip for it.
func fuzzReplica(t *testing.T) (*Replica, *delegate, Entry) {
	t.Helper()
	r := NewReplica(fuzzSelf, fuzzInc, time.Minute)
	c := New(Options{Name: fuzzSelf, Incarnation: fuzzInc}, r)
	own := r.Create(Entry{PresenceID: "own-1", ConnID: "self/c1", MeshID: "m1", MemberID: "a", SessionID: "s1",
		Status: "idle", Groups: []string{"ops"}})
	r.NodeAlive("other", 3)
	r.Apply([]Entry{{PresenceID: "remote-1", Owner: "other", OwnerInc: 3, Epoch: 2, Version: 2,
		MeshID: "m1", MemberID: "b", SessionID: "s2", Status: "working", Groups: []string{"ops"}}})
	return r, &delegate{c}, own
}

func fuzzSeeds() (msgs, states [][]byte) {
	entry := func(id, owner string, inc int64, v uint64, state State) Entry {
		return Entry{PresenceID: id, Owner: owner, OwnerInc: inc, Epoch: v, Version: v, MeshID: "m1", MemberID: "c",
			SessionID: "s-" + id, Cwd: "/x", Status: "idle", Groups: []string{"ops", "dev"}, State: state}
	}
	delta := func(entries ...Entry) []byte {
		b, _ := json.Marshal(deltaMsg{From: "other", Entries: entries})
		return append([]byte{msgDeltas}, b...)
	}
	state := func(from string, inc int64, clock uint64, entries ...Entry) []byte {
		b, _ := json.Marshal(stateMsg{From: from, Inc: inc, Clock: clock, Entries: entries})
		return b
	}
	cmd, _ := json.Marshal(Command{Kind: "hook", PresenceID: "own-1", Status: "idle"})
	msgs = [][]byte{
		nil, {msgDeltas}, {msgCommand}, {'Z', '{', '}'},
		delta(entry("new-1", "other", 3, 9, Live)),
		delta(entry("remote-1", "other", 3, 9, Gone)),
		delta(entry("own-1", "other", 3, 99, Live)),                       // a takeover of our session by another node
		delta(entry("ghost", fuzzSelf, fuzzInc, 5, Live)),                 // a stale copy of one of ours
		delta(entry("huge", "other", 3, math.MaxUint64, Live)),            // a clock at its limit
		delta(Entry{PresenceID: "no-owner", MeshID: "m1", MemberID: "c"}), // invalid
		append([]byte{msgCommand}, cmd...),
		[]byte(`D{"f":"other","e":[{"id":"x","o":"other","m":"m1","mb":"c","x":7}]}`),
		[]byte(`D{"e":[{"id":"x","o":"other","m":"m1","mb":"c","g":null,"e":-1}]}`),
		[]byte(`D{"f":"other","i":3,"q":18446744073709551615,"e":[]}`), // a heartbeat
		[]byte(`A{"f":"other","i":3,"t":7,"q":1}`),
		[]byte(`A{"f":"self","i":7,"t":7,"q":0}`),
		[]byte(`L{"f":"other","i":3}`),
		{msgAck}, {msgLeave},
	}
	states = [][]byte{
		nil, []byte(`{}`), []byte(`[]`), []byte(`{"e":null}`),
		state("other", 3, 10, entry("remote-2", "other", 3, 10, Live)),
		state("other", 3, 10),                      // remote-1 no longer listed: deleted there
		state(fuzzSelf, fuzzInc, math.MaxUint64-1), // forged: claims to be us
		state("other", 4, 1, entry("own-1", fuzzSelf, fuzzInc, 1, Gone)),
	}
	return msgs, states
}

// FuzzGossip feeds arbitrary bytes to the memberlist delegate of a real
// replica, as a gossip message (NotifyMsg) and as a push-pull state
// (MergeRemoteState). Nothing may panic, and the replica must stay
// consistent: every stored entry names its id, owner, mesh and member; the
// indexes hold exactly the present entries; no entry of this node's
// incarnation appears unless this node created it, and a remote message
// cannot delete one; the Lamport clock keeps ordering this node's next
// change after everything it has stored.
func FuzzGossip(f *testing.F) {
	msgs, states := fuzzSeeds()
	for _, m := range msgs {
		for _, s := range states {
			f.Add(m, s, false)
		}
	}
	f.Add(msgs[4], states[4], true)
	f.Fuzz(func(t *testing.T, msg, state []byte, join bool) {
		r, d, own := fuzzReplica(t)
		d.NotifyMsg(msg)
		d.MergeRemoteState(state, join)
		checkReplica(t, r, own)
		r.Expire()
		checkReplica(t, r, own)
		// A new session created now is ordered after every stored entry,
		// so it would win a takeover.
		next := r.Create(Entry{PresenceID: "own-2", ConnID: "self/c2", MeshID: "m1", MemberID: "a", SessionID: "s3"})
		for id, e := range r.entries {
			if id != next.PresenceID && !next.newer(e) {
				t.Fatalf("new entry (%d,%d) is not newer than stored %q (%d,%d)", next.Epoch, next.Version, id, e.Epoch, e.Version)
			}
		}
		checkReplica(t, r, own, next)
		// The read side answers without panicking.
		_ = r.Live("m1")
		_ = r.GroupMembers("m1", "ops")
		_, _ = r.FindSession("m1", "a", "s1")
		checkRoundTrip(t, d)
	})
}

// checkRoundTrip merges the state a node would send (LocalState) into a
// fresh replica: whatever a replica holds, its peers must accept.
func checkRoundTrip(t *testing.T, d *delegate) {
	t.Helper()
	invalid := 0
	peer := &delegate{New(Options{Name: "peer", Incarnation: 1, OnInvalid: func() { invalid++ }},
		NewReplica("peer", 1, time.Minute))}
	peer.MergeRemoteState(d.LocalState(false), false)
	if invalid > 0 {
		t.Fatal("a peer rejected this node's own state")
	}
	checkReplica(t, peer.c.replica)
}

// checkReplica verifies the replica's invariants. created are the entries
// this node made itself.
func checkReplica(t *testing.T, r *Replica, created ...Entry) {
	t.Helper()
	r.mu.RLock()
	defer r.mu.RUnlock()
	mine := map[string]Entry{}
	for _, e := range created {
		mine[e.PresenceID] = e
	}
	for id, e := range r.entries {
		if id != e.PresenceID || e.PresenceID == "" || e.Owner == "" || e.MeshID == "" || e.MemberID == "" {
			t.Fatalf("stored entry without id, owner, mesh or member under %q: %+v", id, *e)
		}
		if e.State > Gone {
			t.Fatalf("stored entry %q with state %d", id, e.State)
		}
		if e.Epoch > r.clock || e.Version > r.clock {
			t.Fatalf("entry %q (%d,%d) is ahead of the clock %d", id, e.Epoch, e.Version, r.clock)
		}
		if e.Owner == r.self && e.OwnerInc == r.inc && e.Present() {
			if _, ok := mine[id]; !ok {
				t.Fatalf("present entry %q claims this node's incarnation but was not created here", id)
			}
		}
		_, gone := r.goneAt[id]
		if e.Present() == gone {
			t.Fatalf("entry %q present=%v but tombstone time recorded=%v", id, e.Present(), gone)
		}
		if e.Present() {
			for name, idx := range map[string]map[string]*Entry{
				"session": r.bySess[e.sessKey()], "mesh": r.byMesh[e.MeshID], "member": r.byMember[e.MemberID]} {
				if idx[id] != e {
					t.Fatalf("present entry %q missing from the %s index", id, name)
				}
			}
		}
	}
	for id := range r.goneAt {
		if r.entries[id] == nil {
			t.Fatalf("tombstone time for unknown entry %q", id)
		}
	}
	for name, idx := range map[string]map[string]map[string]*Entry{"session": r.bySess, "mesh": r.byMesh, "member": r.byMember} {
		for key, set := range idx {
			if len(set) == 0 {
				t.Fatalf("empty %s index set %q", name, key)
			}
			for id, e := range set {
				if r.entries[id] != e || !e.Present() {
					t.Fatalf("%s index %q holds %q, which is not a present stored entry", name, key, id)
				}
				want := map[string]string{"session": e.sessKey(), "mesh": e.MeshID, "member": e.MemberID}[name]
				if key != want {
					t.Fatalf("%s index key %q holds %q, whose key is %q", name, key, id, want)
				}
			}
		}
	}
	// This node's own entries change only through this node, or give way
	// to a takeover (a newer entry of another owner).
	for id, c := range mine {
		e := r.entries[id]
		switch {
		case e == nil:
			t.Fatalf("own entry %q vanished", id)
		case e.Owner == r.self && e.OwnerInc == r.inc:
			if e.State != c.State || e.Version != c.Version {
				t.Fatalf("own entry %q changed by gossip: %+v, created %+v", id, *e, c)
			}
		case !e.newer(&c):
			t.Fatalf("own entry %q replaced by an older entry of %s", id, e.Owner)
		}
	}
}
