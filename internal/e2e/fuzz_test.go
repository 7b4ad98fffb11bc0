package e2e_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"testing"

	"filippo.io/edwards25519"

	"github.com/claudemesh/broker/internal/e2e"
)

// checkOpened enforces the invariants of a successful or failed open: only
// the documented errors, and success only for the seeded message in its one
// canonical encoding (a forgery or a second encoding would be a bug).
func checkOpened(t *testing.T, nonce, ct string, got []byte, err error, want []byte, wantNonce, wantCT string) {
	t.Helper()
	if err != nil {
		if got != nil {
			t.Fatalf("non-nil plaintext %q with error %v", got, err)
		}
		if !errors.Is(err, e2e.ErrDecrypt) && !errors.Is(err, e2e.ErrMalformed) {
			t.Fatalf("undocumented error %v", err)
		}
		return
	}
	if nonce != wantNonce || ct != wantCT || !bytes.Equal(got, want) {
		t.Fatalf("opened an unexpected message: nonce %q ciphertext %q plaintext %q", nonce, ct, got)
	}
}

func FuzzOpenDirect(f *testing.F) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	msg := []byte("fuzz me")
	// The setup runs again in every fuzzing worker, so the seed message must
	// be deterministic.
	fixedNonce := [e2e.NonceSize]byte{1, 2, 3}
	nonce := base64.StdEncoding.EncodeToString(fixedNonce[:])
	ct, err := e2e.SealDirectWithNonce(msg, &fixedNonce, bobPub, alicePriv)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(nonce, ct)
	f.Add(nonce, ct[:len(ct)-4])
	f.Add(nonce, "")
	f.Add("", ct)
	f.Add(nonce[:30]+"==", ct)
	f.Add(nonce, ct+"\n")
	f.Fuzz(func(t *testing.T, n, c string) {
		got, err := e2e.OpenDirect(n, c, alicePub, bobPriv)
		checkOpened(t, n, c, got, err, msg, nonce, ct)
	})
}

func FuzzOpenGroup(f *testing.F) {
	key, err := e2e.ParseMeshKeyHex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	if err != nil {
		f.Fatal(err)
	}
	msg := []byte("fuzz the mesh")
	fixedNonce := [e2e.NonceSize]byte{4, 5, 6}
	nonce := base64.StdEncoding.EncodeToString(fixedNonce[:])
	ct := e2e.SealGroupWithNonce(msg, &fixedNonce, key)
	f.Add(nonce, ct)
	f.Add(nonce, ct[:len(ct)-4])
	f.Add(nonce, "AAAA")
	f.Add("AAAA", ct)
	f.Add(nonce, base64.StdEncoding.EncodeToString(make([]byte, e2e.Overhead)))
	f.Fuzz(func(t *testing.T, n, c string) {
		got, err := e2e.OpenGroup(n, c, key)
		checkOpened(t, n, c, got, err, msg, nonce, ct)
	})
}

// FuzzPublicKeyToCurve25519 checks that arbitrary input never panics and that
// the accepted keys are exactly those a second, independent formulation of
// libsodium's rule accepts: a point P with [8]P != O and P = [1/8]([8]P) mod L
// (that is, no torsion component). Accepted keys must also be canonical
// encodings, and convert to the Montgomery u-coordinate.
func FuzzPublicKeyToCurve25519(f *testing.F) {
	pub, _ := testKey("alice")
	f.Add([]byte(pub))
	f.Add(make([]byte, 32))
	f.Add([]byte{1, 31: 0})
	f.Add(bytes.Repeat([]byte{0xff}, 32))
	f.Add([]byte{0xec, 1: 0xff, 2: 0xff, 31: 0x7f})
	f.Add([]byte{})

	var eight [32]byte
	eight[0] = 8
	s8, err := edwards25519.NewScalar().SetCanonicalBytes(eight[:])
	if err != nil {
		f.Fatal(err)
	}
	invEight := edwards25519.NewScalar().Invert(s8)
	identity := edwards25519.NewIdentityPoint()

	f.Fuzz(func(t *testing.T, in []byte) {
		got, err := e2e.PublicKeyToCurve25519(ed25519.PublicKey(in))
		if err != nil && !errors.Is(err, e2e.ErrInvalidPublicKey) {
			t.Fatalf("undocumented error %v", err)
		}
		want := len(in) == 32
		var p *edwards25519.Point
		if want {
			p, err = new(edwards25519.Point).SetBytes(in)
			want = err == nil
		}
		if want {
			p8 := new(edwards25519.Point).MultByCofactor(p)
			prime := new(edwards25519.Point).ScalarMult(invEight, p8)
			want = p8.Equal(identity) == 0 && prime.Equal(p) == 1
		}
		if (got != nil) != want {
			t.Fatalf("PublicKeyToCurve25519(%x) accepted=%v, oracle says %v", in, got != nil, want)
		}
		if got == nil {
			return
		}
		if !bytes.Equal(p.Bytes(), in) {
			t.Fatalf("accepted non-canonical encoding %x", in)
		}
		if !bytes.Equal(got[:], p.BytesMontgomery()) {
			t.Fatalf("converted %x to %x, want %x", in, got, p.BytesMontgomery())
		}
	})
}
