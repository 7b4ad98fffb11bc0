package store_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/store"
)

// helloSeen reports whether a signature was recorded.
func helloSeen(t *testing.T, s *store.Store, sig string) bool {
	t.Helper()
	var n int
	if err := s.Pool().QueryRow(context.Background(), `SELECT count(*) FROM hello_seen WHERE signature_hash = $1`, []byte(sig)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// MemberHello loads members and records a hello in one statement, and
// writes nothing for a hello that is not a live member's under the id it
// names: a stranger's key, a member's key under another member's id, a
// revoked member, a made-up mesh. A member's hello takes its pending hook
// status, once; the same signature again is a replay.
func TestMemberHello(t *testing.T) {
	s := open(t)
	f := seed(t, s, 3)
	ctx := context.Background()
	if _, err := s.RevokeMember(ctx, f.mesh.ID, f.members[2].Pubkey); err != nil {
		t.Fatal(err)
	}
	if err := s.AddPendingStatus(ctx, 42, "/w", "working", "", ""); err != nil {
		t.Fatal(err)
	}
	check := func(sig string, pub string) store.HelloCheck {
		return store.HelloCheck{SigHash: []byte(sig), PID: 42, Cwd: "/w", MeshID: f.mesh.ID, Pubkey: pub}
	}
	stranger := fmt.Sprintf("%064x", 99)
	for _, c := range []struct {
		name, sig, member, pubkey string
		all                       bool
		want                      int // members returned
	}{
		{"a stranger's key", "s-stranger", f.members[0].ID, stranger, true, 2},
		{"a stranger's key, one member asked", "s-stranger1", f.members[0].ID, stranger, false, 0},
		{"a member's key under another id", "s-other", f.members[1].ID, f.members[0].Pubkey, true, 2},
		{"a revoked member", "s-revoked", f.members[2].ID, f.members[2].Pubkey, false, 0},
	} {
		ms, recorded, res, err := s.MemberHello(ctx, time.Minute, 10*time.Second, c.all, c.member, check(c.sig, c.pubkey))
		if err != nil || recorded || res != (store.HelloResult{}) || len(ms) != c.want {
			t.Errorf("%s: %d members, recorded %v, %+v, %v; want %d members and nothing recorded", c.name, len(ms), recorded, res, err, c.want)
		}
		if helloSeen(t, s, c.sig) {
			t.Errorf("%s: its signature was written", c.name)
		}
	}
	other := check("s-mesh", f.members[0].Pubkey)
	other.MeshID = "made-up"
	if ms, recorded, _, err := s.MemberHello(ctx, time.Minute, 10*time.Second, true, f.members[0].ID, other); err != nil || recorded || len(ms) != 0 || helloSeen(t, s, "s-mesh") {
		t.Errorf("a made-up mesh: %d members, recorded %v, %v", len(ms), recorded, err)
	}

	ms, recorded, res, err := s.MemberHello(ctx, time.Minute, 10*time.Second, true, f.members[0].ID, check("s-0", f.members[0].Pubkey))
	if err != nil || !recorded || res != (store.HelloResult{Fresh: true, Pending: "working"}) || len(ms) != 2 ||
		ms[0].ID != f.members[0].ID || ms[1].ID != f.members[1].ID {
		t.Fatalf("a member's hello: %+v, recorded %v, %+v, %v", ms, recorded, res, err)
	}
	ms, recorded, res, err = s.MemberHello(ctx, time.Minute, 10*time.Second, false, f.members[0].ID, check("s-0", f.members[0].Pubkey))
	if err != nil || !recorded || res != (store.HelloResult{}) || len(ms) != 1 || ms[0].ID != f.members[0].ID {
		t.Fatalf("the same hello again: %+v, recorded %v, %+v, %v; want a replay", ms, recorded, res, err)
	}
	if res, err := s.AcceptHellos(ctx, time.Minute, 10*time.Second, []store.HelloCheck{check("s-0", f.members[0].Pubkey)}); err != nil || res[0].Fresh {
		t.Fatalf("AcceptHellos of a signature MemberHello recorded: %+v, %v", res, err)
	}
	// A value Postgres refuses: the members are still read, nothing is
	// recorded, and AcceptHellos reports the refusal.
	bad := check("s-bad", f.members[1].Pubkey)
	bad.Cwd = "bad\x00cwd"
	ms, recorded, _, err = s.MemberHello(ctx, time.Minute, 10*time.Second, true, f.members[1].ID, bad)
	if err != nil || recorded || len(ms) != 2 || helloSeen(t, s, "s-bad") {
		t.Fatalf("a refused value: %d members, recorded %v, %v", len(ms), recorded, err)
	}
	if res, err := s.AcceptHellos(ctx, time.Minute, 10*time.Second, []store.HelloCheck{bad}); err != nil || !store.IsDataError(res[0].Err) {
		t.Fatalf("AcceptHellos of the refused value: %+v, %v", res, err)
	}
}
