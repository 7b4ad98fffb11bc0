package auth_test

import (
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strconv"
	"testing"
	"time"

	"filippo.io/edwards25519"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/protocol"
)

// smallOrder are canonical encodings of curve points of small order (the
// identity, the point of order 2, both of order 4, two of order 8), the
// keys libsodium refuses.
var smallOrder = []string{
	"0100000000000000000000000000000000000000000000000000000000000000",
	"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	"0000000000000000000000000000000000000000000000000000000000000000",
	"0000000000000000000000000000000000000000000000000000000000000080",
	"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
	"c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
}

// With a small-order public key anyone can sign anything: R = the key and
// S = 0 pass Go's ed25519.Verify for a share of messages (all of them for
// the identity). The broker refuses such signatures on hellos, hooks and
// invites, and such keys at enrolment, as libsodium does.
func TestSmallOrderKeysRefused(t *testing.T) {
	now := time.UnixMilli(1764480000000)
	identity := edwards25519.NewIdentityPoint()
	forgeries := 0
	for _, enc := range smallOrder {
		pub, _ := hex.DecodeString(enc)
		p, err := new(edwards25519.Point).SetBytes(pub)
		if err != nil || new(edwards25519.Point).MultByCofactor(p).Equal(identity) != 1 {
			t.Fatalf("%s is not a point of small order (%v)", enc, err)
		}
		if auth.ValidPubkey(enc) {
			t.Errorf("small-order key %s accepted for enrolment", enc)
		}
		sig := hex.EncodeToString(append(append([]byte{}, pub...), make([]byte, 32)...)) // R = key, S = 0
		for i := int64(0); i < 32; i++ {
			ts := now.UnixMilli() + i
			h := protocol.Hello{MeshID: "mesh", MemberID: "member", Pubkey: enc, Timestamp: json.Number(strconv.FormatInt(ts, 10)), Signature: sig}
			raw, _ := hex.DecodeString(sig)
			if ed25519.Verify(pub, []byte(protocol.CanonicalHello(h.MeshID, h.MemberID, h.Pubkey, ts)), raw) {
				forgeries++
			}
			if reason := auth.VerifyHello(&h, now); reason != protocol.ReasonBadSignature {
				t.Fatalf("forged hello for key %s: %q, want bad_signature", enc, reason)
			}
			body := []byte(`{"cwd":"/x","status":"idle","n":` + strconv.FormatInt(i, 10) + `}`)
			hh := http.Header{}
			hh.Set(auth.HeaderMeshID, "mesh")
			hh.Set(auth.HeaderPubkey, enc)
			hh.Set(auth.HeaderTimestamp, strconv.FormatInt(ts, 10))
			hh.Set(auth.HeaderSignature, sig)
			if _, _, err := auth.VerifyHook(hh, body, now); err == nil {
				t.Fatalf("forged hook for key %s accepted", enc)
			}
		}
		inv := auth.Invite{V: 1, InviteID: "i", MeshID: "m", Role: "member", OwnerPubkey: enc, Signature: sig}
		if inv.Verify() == nil {
			t.Fatalf("forged invite for owner key %s accepted", enc)
		}
	}
	if forgeries == 0 {
		t.Fatal("ed25519.Verify accepted none of the forgeries: this test would not notice a regression")
	}
	t.Logf("ed25519.Verify alone accepted %d of %d forged signatures", forgeries, 32*len(smallOrder))
	// A real key is valid, and its signatures still verify.
	if !auth.ValidPubkey(auth.PubkeyHex(seedKey)) {
		t.Fatal("a real key refused")
	}
	if h := signedHello(now.UnixMilli()); auth.VerifyHello(&h, now) != "" {
		t.Fatal("a signed hello refused")
	}
}
