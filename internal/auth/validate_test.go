package auth_test

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/auth"
)

// A hook signed by a real key over a mesh id that Postgres would refuse
// (invalid UTF-8: a header may carry any byte but NUL) is malformed: it
// never reaches the membership lookup.
func TestVerifyHookRefusesBadMeshID(t *testing.T) {
	now := time.Now()
	body := []byte(`{"cwd":"/x","status":"idle"}`)
	for _, mesh := range []string{"m\xff", "m\xc3\x28"} {
		h := http.Header{}
		auth.SignHook(h, seedKey, mesh, body, now)
		if _, _, err := auth.VerifyHook(h, body, now); !errors.Is(err, auth.ErrHookMalformed) {
			t.Errorf("hook for mesh %q: %v, want malformed", mesh, err)
		}
	}
	h := http.Header{}
	auth.SignHook(h, seedKey, "mesh", body, now)
	if _, _, err := auth.VerifyHook(h, body, now); err != nil {
		t.Fatalf("valid hook: %v", err)
	}
}

// An invite whose signed fields hold a NUL is malformed, signed or not.
func TestParseInviteRefusesNUL(t *testing.T) {
	inv := auth.Invite{V: 1, InviteID: "i", MeshID: "m", MeshSlug: "s", MeshName: "bad\x00name", BrokerURL: "ws://x/ws",
		ExpiresAt: 1, Role: "member"}
	inv.Sign(seedKey)
	if _, err := auth.ParseInvite(inv.Token()); !errors.Is(err, auth.ErrInviteMalformed) {
		t.Fatalf("invite with NUL: %v, want malformed", err)
	}
	inv.MeshName = "good"
	inv.Sign(seedKey)
	if _, err := auth.ParseInvite(inv.Token()); err != nil {
		t.Fatalf("valid invite: %v", err)
	}
}
