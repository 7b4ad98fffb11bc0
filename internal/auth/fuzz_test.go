package auth_test

import (
	"crypto/ed25519"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/protocol"
)

var seedKey = ed25519.NewKeyFromSeed(make([]byte, 32))

func signedHello(ts int64) protocol.Hello {
	pub := auth.PubkeyHex(seedKey)
	return protocol.Hello{Type: "hello", MeshID: "mesh", MemberID: "member", Pubkey: pub, SessionID: "s", Cwd: "/",
		Timestamp: json.Number(strconv.FormatInt(ts, 10)), Signature: auth.SignHello(seedKey, "mesh", "member", pub, ts)}
}

// Hello verification never panics and accepts only a hello whose fields
// are the signed ones: the same strings, except that the timestamp may be
// spelled differently (the signature covers its value) and the signature's
// hex may differ in case (the same bytes; replay protection hashes it in
// lower case).
func FuzzVerifyHello(f *testing.F) {
	now := time.UnixMilli(1764480000000)
	good := signedHello(now.UnixMilli())
	f.Add(good.MeshID, good.MemberID, good.Pubkey, string(good.Timestamp), good.Signature)
	f.Add("", "", "", "0", "")
	f.Add("mesh", "member", good.Pubkey, "1764480061000", good.Signature)
	f.Add("mesh|x", "member", good.Pubkey, string(good.Timestamp), good.Signature[:127]+"0")
	f.Fuzz(func(t *testing.T, mesh, member, pubkey, ts, sig string) {
		h := protocol.Hello{MeshID: mesh, MemberID: member, Pubkey: pubkey, Timestamp: json.Number(ts), Signature: sig}
		reason := auth.VerifyHello(&h, now)
		same := mesh == good.MeshID && member == good.MemberID && pubkey == good.Pubkey && sameNumber(ts, string(good.Timestamp)) &&
			strings.EqualFold(sig, good.Signature)
		if reason == "" && !same {
			t.Fatalf("accepted a hello that was not signed: %+v", h)
		}
		if same && reason != "" {
			t.Fatalf("rejected the signed hello: %s", reason)
		}
	})
}

// Hook signature verification never panics and accepts only the signed
// body and headers (up to the case of hex and the spelling of the
// timestamp, as for hellos).
func FuzzVerifyHook(f *testing.F) {
	now := time.UnixMilli(1764480000000)
	body := []byte(`{"cwd":"/x","status":"idle"}`)
	h := http.Header{}
	auth.SignHook(h, seedKey, "mesh", body, now)
	f.Add(body, h.Get(auth.HeaderMeshID), h.Get(auth.HeaderPubkey), h.Get(auth.HeaderTimestamp), h.Get(auth.HeaderSignature))
	f.Add([]byte{}, "", "", "", "")
	f.Add(body, "mesh", h.Get(auth.HeaderPubkey), "abc", h.Get(auth.HeaderSignature))
	f.Fuzz(func(t *testing.T, b []byte, mesh, pub, ts, sig string) {
		hh := http.Header{}
		hh.Set(auth.HeaderMeshID, mesh)
		hh.Set(auth.HeaderPubkey, pub)
		hh.Set(auth.HeaderTimestamp, ts)
		hh.Set(auth.HeaderSignature, sig)
		_, _, err := auth.VerifyHook(hh, b, now)
		same := string(b) == string(body) && mesh == "mesh" && strings.EqualFold(hh.Get(auth.HeaderPubkey), h.Get(auth.HeaderPubkey)) &&
			sameNumber(ts, h.Get(auth.HeaderTimestamp)) && strings.EqualFold(sig, h.Get(auth.HeaderSignature))
		if err == nil && !same {
			t.Fatalf("accepted an unsigned hook")
		}
		if same && err != nil {
			t.Fatalf("rejected the signed hook: %v", err)
		}
	})
}

// sameNumber reports whether a and b are decimal integers of equal value.
func sameNumber(a, b string) bool {
	x, err1 := strconv.ParseInt(a, 10, 64)
	y, err2 := strconv.ParseInt(b, 10, 64)
	return err1 == nil && err2 == nil && x == y
}

// Invite parsing never panics; a parsed invite's token parses back to it.
func FuzzParseInvite(f *testing.F) {
	inv := auth.Invite{V: 1, InviteID: "i", MeshID: "m", MeshSlug: "s", MeshName: "n", BrokerURL: "ws://x/ws",
		ExpiresAt: 1, Role: "member"}
	inv.Sign(seedKey)
	f.Add(inv.Token())
	f.Add("cm1.")
	f.Add("claudemesh://join/" + inv.Token())
	f.Add("cm1.e30")
	f.Fuzz(func(t *testing.T, token string) {
		p, err := auth.ParseInvite(token)
		if err != nil {
			return
		}
		q, err := auth.ParseInvite(p.Token())
		if err != nil || *q != *p {
			t.Fatalf("token round trip: %v %+v %+v", err, p, q)
		}
		if p.Verify() == nil && p.Canonical() != inv.Canonical() && p.OwnerPubkey == inv.OwnerPubkey {
			t.Fatalf("forged invite verified: %+v", p)
		}
	})
}
