package presence_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

// invariants checks the replica's counters against a full recount.
func invariants(t *testing.T, r *presence.Replica, meshes []string) {
	t.Helper()
	_, all := r.Snapshot()
	present := 0
	for _, e := range all {
		if e.Present() {
			present++
		}
	}
	if r.Len() != present {
		t.Fatalf("Len %d, recount %d", r.Len(), present)
	}
	for _, m := range meshes {
		if got, want := r.CountLive(m), len(r.Live(m)); got != want {
			t.Fatalf("CountLive(%s) %d, Live has %d", m, got, want)
		}
	}
}

func entry(id, mesh, member, session string) presence.Entry {
	return presence.Entry{PresenceID: id, MeshID: mesh, MemberID: member, SessionID: session,
		Status: protocol.StatusIdle, StatusSource: protocol.SourceJSONL, ConnID: "c-" + id}
}

// The owner's entries go through their whole life: live, updated, grace,
// reattached (a higher epoch wins), removed; counters stay exact.
func TestReplicaLifecycle(t *testing.T) {
	a := presence.NewReplica("a", 1, time.Hour)
	b := presence.NewReplica("b", 1, time.Hour)
	var changes []presence.Change
	a.SetObservers(func(c []presence.Change) { changes = append(changes, c...) }, func(own []presence.Entry) { b.Apply(own) })
	b.SetObservers(nil, func(own []presence.Entry) { a.Apply(own) })
	a.NodeAlive("b", 1)
	b.NodeAlive("a", 1)
	meshes := []string{"m1", "m2"}

	e := a.Create(entry("p1", "m1", "u1", "s1"))
	if e.Owner != "a" || e.Epoch == 0 {
		t.Fatalf("create: %+v", e)
	}
	if changes[0].Prev != nil || !changes[0].Cur.IsLive() {
		t.Fatalf("first change %+v", changes[0])
	}
	a.Create(entry("p2", "m1", "u2", "s2"))
	eph := entry("p3", "m2", "u3", "s3")
	eph.Ephemeral = true
	a.Create(eph)
	invariants(t, a, meshes)
	invariants(t, b, meshes)
	if a.CountLive("m1") != 2 || a.CountLive("m2") != 0 || b.CountLive("m1") != 2 {
		t.Fatalf("counts a=%d/%d b=%d", a.CountLive("m1"), a.CountLive("m2"), b.CountLive("m1"))
	}

	// Disconnect by a connection that no longer owns the session: no effect.
	if _, ok := a.Disconnect("p1", "someone-else"); ok {
		t.Fatal("stale connection moved the entry to grace")
	}
	if _, ok := a.Disconnect("p1", "c-p1"); !ok {
		t.Fatal("disconnect failed")
	}
	invariants(t, a, meshes)
	if a.CountLive("m1") != 1 || b.CountLive("m1") != 1 {
		t.Fatalf("grace still counted: a=%d b=%d", a.CountLive("m1"), b.CountLive("m1"))
	}

	// b takes the session over: a sees b as the owner.
	prev, ok := b.FindSession("m1", "u1", "s1")
	if !ok || !prev.InGrace() {
		t.Fatalf("b does not see the grace entry: %+v", prev)
	}
	taken := entry("p1", "m1", "u1", "s1")
	taken.ConnID = "c-b"
	b.Create(taken)
	got, _ := a.Get("p1")
	if got.Owner != "b" || !got.IsLive() {
		t.Fatalf("takeover not applied on a: %+v", got)
	}
	// A late update from the old owner loses to the takeover's epoch.
	if _, ok := a.Update("p1", func(e *presence.Entry) bool { e.Summary = "late"; return true }); ok {
		t.Fatal("a updated an entry it no longer owns")
	}
	invariants(t, a, meshes)
	invariants(t, b, meshes)

	if _, ok := a.Remove("p2"); !ok {
		t.Fatal("remove")
	}
	invariants(t, a, meshes)
	invariants(t, b, meshes)
	if _, ok := b.Get("p2"); ok {
		t.Fatal("tombstone not replicated")
	}
	// A stale live copy of the removed entry cannot resurrect it.
	stale := entry("p2", "m1", "u2", "s2")
	stale.Owner, stale.OwnerInc, stale.Epoch, stale.Version = "a", 1, 2, 2
	b.Apply([]presence.Entry{stale})
	if _, ok := b.Get("p2"); ok {
		t.Fatal("stale copy resurrected a removed entry")
	}
}

// A dead owner's entries are orphans (grace) everywhere; if the node comes
// back with the same incarnation they are live again; with a new one they
// stay orphans and expire.
func TestReplicaOrphans(t *testing.T) {
	r := presence.NewReplica("a", 1, 50*time.Millisecond)
	r.NodeAlive("b", 7)
	e := entry("x", "m", "u", "s")
	e.Owner, e.OwnerInc, e.Epoch, e.Version = "b", 7, 3, 3
	r.Apply([]presence.Entry{e})
	invariants(t, r, []string{"m"})
	if r.CountLive("m") != 1 {
		t.Fatal("remote entry not live")
	}
	r.NodeDead("b")
	invariants(t, r, []string{"m"})
	if r.CountLive("m") != 0 || r.Len() != 1 {
		t.Fatalf("orphan: live %d present %d", r.CountLive("m"), r.Len())
	}
	r.NodeAlive("b", 7)
	if r.CountLive("m") != 1 {
		t.Fatal("entry not live again when its node came back")
	}
	r.NodeDead("b")
	r.NodeAlive("b", 8) // restarted: the old entry stays an orphan
	invariants(t, r, []string{"m"})
	if r.CountLive("m") != 0 {
		t.Fatal("a previous incarnation's entry is live")
	}
	deadline := time.Now().Add(2 * time.Second)
	for r.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("orphan never expired")
		}
		r.Expire()
		time.Sleep(10 * time.Millisecond)
	}
	invariants(t, r, []string{"m"})
}

// Random operations keep the counters equal to a recount.
func TestReplicaCountersRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 9))
	a := presence.NewReplica("a", 1, time.Hour)
	b := presence.NewReplica("b", 1, time.Hour)
	a.SetObservers(nil, func(own []presence.Entry) { b.Apply(own) })
	b.SetObservers(nil, func(own []presence.Entry) { a.Apply(own) })
	a.NodeAlive("b", 1)
	b.NodeAlive("a", 1)
	meshes := []string{"m0", "m1", "m2"}
	for i := 0; i < 2000; i++ {
		r := a
		if rng.IntN(2) == 1 {
			r = b
		}
		id := fmt.Sprint("p", rng.IntN(40))
		switch rng.IntN(6) {
		case 0, 1:
			e := entry(id, meshes[rng.IntN(3)], fmt.Sprint("u", rng.IntN(10)), id)
			e.Ephemeral = rng.IntN(5) == 0
			r.Create(e)
		case 2:
			cur, _ := r.Get(id)
			r.Disconnect(id, cur.ConnID)
		case 3:
			r.Remove(id)
		case 4:
			r.Update(id, func(e *presence.Entry) bool { e.Ephemeral = !e.Ephemeral; return rng.IntN(2) == 0 })
		case 5:
			if rng.IntN(10) == 0 {
				r.NodeDead("b")
				r.NodeAlive("b", 1)
			}
		}
		invariants(t, a, meshes)
		invariants(t, b, meshes)
	}
}

// linkedPair is two replicas, a (node a, incarnation 1) and b (node b,
// incarnation 2), that see each other alive and apply each other's own
// entries at once, as gossip would.
func linkedPair() (a, b *presence.Replica) {
	a = presence.NewReplica("a", 1, time.Hour)
	b = presence.NewReplica("b", 2, time.Hour)
	a.SetObservers(nil, func(own []presence.Entry) { b.Apply(own) })
	b.SetObservers(nil, func(own []presence.Entry) { a.Apply(own) })
	a.NodeAlive("b", 2)
	b.NodeAlive("a", 1)
	return a, b
}

// SoleRemoteSession names a member's session only when it is the member's
// one present session, live, and on another node.
func TestSoleRemoteSession(t *testing.T) {
	a, b := linkedPair()

	b.Create(entry("p1", "m", "u1", "s1"))
	e, ok := a.SoleRemoteSession("u1")
	if !ok || e.Owner != "b" || e.OwnerInc != 2 || e.ConnID != "c-p1" || e.PresenceID != "p1" {
		t.Fatalf("a: %+v %v", e, ok)
	}
	if _, ok := b.SoleRemoteSession("u1"); ok {
		t.Fatal("the owner itself sees its session as remote")
	}
	if _, ok := a.SoleRemoteSession("nobody"); ok {
		t.Fatal("a member without sessions has one")
	}
	// A second session, anywhere, or the only one in grace: none.
	a.Create(entry("p2", "m", "u1", "s2"))
	if _, ok := a.SoleRemoteSession("u1"); ok {
		t.Fatal("two sessions, one sole")
	}
	a.Remove("p2")
	if _, ok := a.SoleRemoteSession("u1"); !ok {
		t.Fatal("back to one session")
	}
	b.Disconnect("p1", "c-p1")
	if _, ok := a.SoleRemoteSession("u1"); ok {
		t.Fatal("a session in grace is sole")
	}
	// A live session whose node is dead is an orphan: not sole either.
	b.Create(entry("p3", "m", "u3", "s3"))
	if _, ok := a.SoleRemoteSession("u3"); !ok {
		t.Fatal("u3")
	}
	a.NodeDead("b")
	if _, ok := a.SoleRemoteSession("u3"); ok {
		t.Fatal("an orphan is sole")
	}
}

// A member is online with a visible live session on any node: not with
// only ephemeral or send-only ones, one in grace, or an orphan.
func TestMemberOnline(t *testing.T) {
	a, b := linkedPair()
	if a.MemberOnline("u1") {
		t.Fatal("a member without sessions is online")
	}
	eph := entry("p1", "m", "u1", "s1")
	eph.Ephemeral = true
	so := entry("p2", "m", "u1", "s2")
	so.SendOnly, so.Ephemeral = true, true
	a.Create(eph)
	a.Create(so)
	if a.MemberOnline("u1") {
		t.Fatal("online with ephemeral and send-only sessions only")
	}
	b.Create(entry("p3", "m", "u1", "s3"))
	if !a.MemberOnline("u1") || !b.MemberOnline("u1") {
		t.Fatal("a visible session on another node: not online")
	}
	b.Disconnect("p3", "c-p3")
	if a.MemberOnline("u1") {
		t.Fatal("online with a session in grace")
	}
	b.Create(entry("p4", "m", "u4", "s4"))
	a.NodeDead("b")
	if a.MemberOnline("u4") || !b.MemberOnline("u4") {
		t.Fatal("an orphan counts as online")
	}
}
