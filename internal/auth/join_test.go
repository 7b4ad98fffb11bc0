package auth_test

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/auth"
)

func testInvite() *auth.Invite {
	inv := &auth.Invite{V: 1, InviteID: "inv1", MeshID: "mesh1", MeshSlug: "m", MeshName: "M", BrokerURL: "ws://x/ws",
		ExpiresAt: 1764480000000, Role: "member"}
	inv.Sign(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)))
	return inv
}

// A join proof verifies only for the key, invite and name it was made for.
func TestJoinProof(t *testing.T) {
	inv := testInvite()
	pub := auth.PubkeyHex(seedKey)
	sig := auth.SignJoin(seedKey, inv, "alice")
	if err := auth.VerifyJoin(pub, sig, inv, "alice"); err != nil {
		t.Fatalf("the proof does not verify: %v", err)
	}
	if err := auth.VerifyJoin(strings.ToUpper(pub), strings.ToUpper(sig), inv, "alice"); err != nil {
		t.Fatalf("upper-case hex: %v", err)
	}
	if err := auth.VerifyJoin(pub, "", inv, "alice"); !errors.Is(err, auth.ErrJoinUnproven) {
		t.Fatalf("no signature: %v, want ErrJoinUnproven", err)
	}
	other := testInvite()
	other.InviteID = "inv2"
	other.Sign(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32)))
	otherKey := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
	for name, err := range map[string]error{
		"another name":   auth.VerifyJoin(pub, sig, inv, "alice "),
		"another invite": auth.VerifyJoin(pub, sig, other, "alice"),
		"another key":    auth.VerifyJoin(auth.PubkeyHex(otherKey), sig, inv, "alice"),
		"not hex":        auth.VerifyJoin(pub, strings.Repeat("x", 128), inv, "alice"),
		"short":          auth.VerifyJoin(pub, sig[:126], inv, "alice"),
	} {
		if !errors.Is(err, auth.ErrJoinProof) {
			t.Errorf("%s: %v, want ErrJoinProof", name, err)
		}
	}
	if bytes.Equal(auth.HookReplayKey(sig), auth.SignatureHash(sig)) {
		t.Fatal("a hook's replay key equals a hello's for the same signature")
	}
	if !bytes.Equal(auth.HookReplayKey(sig), auth.HookReplayKey(strings.ToUpper(sig))) {
		t.Fatal("the replay key depends on the hex's case: a replay in upper case would pass")
	}
}

// Join proof verification never panics and accepts only the signed
// pubkey, name and invite (up to the case of hex).
func FuzzVerifyJoin(f *testing.F) {
	inv := testInvite()
	pub := auth.PubkeyHex(seedKey)
	good := auth.SignJoin(seedKey, inv, "alice")
	f.Add(pub, good, "alice", inv.MeshID, inv.InviteID)
	f.Add(pub, "", "alice", inv.MeshID, inv.InviteID)
	f.Add(pub, good, "alice|x", inv.MeshID, inv.InviteID)
	f.Add(pub, good, "alice", inv.MeshID+"|inv1", "")
	f.Add("00", "zz", "", "", "")
	f.Fuzz(func(t *testing.T, pubkey, sig, name, mesh, invite string) {
		v := *inv
		v.MeshID, v.InviteID = mesh, invite
		err := auth.VerifyJoin(pubkey, sig, &v, name)
		same := strings.EqualFold(pubkey, pub) && strings.EqualFold(sig, good) && name == "alice" && mesh == inv.MeshID && invite == inv.InviteID
		if err == nil && !same {
			t.Fatalf("accepted a join proof that was not signed: %q %q %q %q %q", pubkey, sig, name, mesh, invite)
		}
		if same && err != nil {
			t.Fatalf("refused the signed proof: %v", err)
		}
	})
}
