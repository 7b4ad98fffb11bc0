package admission_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/admission"
)

// An address gets maxOpen sockets, of which at most maxPending without a
// hello; closing and saying hello give places back.
func TestAddrs(t *testing.T) {
	a := admission.NewAddrs(3, 2)
	for i := range 2 {
		if r := a.Admit("k"); r != "" {
			t.Fatalf("socket %d refused: %s", i, r)
		}
	}
	if r := a.Admit("k"); r != "too many connections from this address waiting for their hello" {
		t.Fatalf("third hello-less socket: %q", r)
	}
	if r := a.Admit("other"); r != "" {
		t.Fatalf("another address refused: %s", r)
	}
	a.Authed("k")
	if r := a.Admit("k"); r != "" {
		t.Fatalf("after a hello: %q", r)
	}
	a.Authed("k")
	if r := a.Admit("k"); r != "too many connections from this address" {
		t.Fatalf("fourth socket: %q", r)
	}
	a.Release("k", true)
	if r := a.Admit("k"); r != "" {
		t.Fatalf("after a close: %q", r)
	}
	// All closed: the address starts afresh (its entries are gone).
	a.Release("k", true)
	a.Release("k", true)
	a.Release("k", false)
	a.Release("k", false)
	for i := range 2 {
		if r := a.Admit("k"); r != "" {
			t.Fatalf("afresh, socket %d refused: %s", i, r)
		}
	}
}

type counts struct{ live, member int }

func (c *counts) CountLive(string) int      { return c.live }
func (c *counts) MemberSessions(string) int { return c.member }

// Hellos in flight hold their places against each other until released;
// a reattaching session takes none; the replaced visible session frees its
// mesh place.
func TestSlots(t *testing.T) {
	c := &counts{live: 1, member: 0}
	sl := admission.NewSlots(c, 3, 2)
	r1, _, ok := sl.Reserve("mesh", "m", true, false, false)
	if !ok {
		t.Fatal("first hello refused")
	}
	r2, _, ok := sl.Reserve("mesh", "m", true, false, false)
	if !ok {
		t.Fatal("second hello refused")
	}
	if _, reason, ok := sl.Reserve("mesh", "m", false, false, false); ok || reason != "sessions per member" {
		t.Fatalf("third hello of the member: ok %v, reason %q", ok, reason)
	}
	if _, reason, ok := sl.Reserve("mesh", "other", true, false, false); ok || reason != "" {
		t.Fatalf("a full mesh: ok %v, reason %q", ok, reason)
	}
	// Not mesh-capped (ephemeral, send-only): the mesh cap does not apply.
	r3, _, ok := sl.Reserve("mesh", "other", false, false, false)
	if !ok {
		t.Fatal("an uncapped hello was refused by the mesh cap")
	}
	r3()
	// Reattaching over a visible entry: no new place.
	c.member = 2
	r4, _, ok := sl.Reserve("mesh", "x", true, true, true)
	if !ok {
		t.Fatal("a reattach was refused")
	}
	c.member = 0
	r1()
	r1() // release is idempotent: one place back, not two
	ry, _, ok := sl.Reserve("mesh", "y", true, false, false)
	if !ok {
		t.Fatal("the released place was not given back")
	}
	if _, _, ok := sl.Reserve("mesh", "z", true, false, false); ok {
		t.Fatal("the mesh had room after one release counted twice")
	}
	r2()
	r4()
	ry()
	r5, _, ok := sl.Reserve("mesh", "m", true, false, false)
	if !ok {
		t.Fatal("places not given back")
	}
	r5()
}
