package e2e_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"golang.org/x/crypto/curve25519"

	"github.com/claudemesh/broker/internal/e2e"
)

// testKey returns a deterministic key pair for tests.
func testKey(label string) (ed25519.PublicKey, ed25519.PrivateKey) {
	seed := sha256.Sum256([]byte("claudemesh e2e test key " + label))
	priv := ed25519.NewKeyFromSeed(seed[:])
	return priv.Public().(ed25519.PublicKey), priv
}

func TestDirectRoundTrip(t *testing.T) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	for _, msg := range [][]byte{nil, {}, []byte("hi"), []byte("ünïcødé ✓"), pattern(1 << 16)} {
		nonce, ct, err := e2e.SealDirect(msg, bobPub, alicePriv)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(mustB64(t, ct)); n != len(msg)+e2e.Overhead {
			t.Errorf("ciphertext is %d bytes for a %d-byte message", n, len(msg))
		}
		got, err := e2e.OpenDirect(nonce, ct, alicePub, bobPriv)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("OpenDirect = %q, %v", truncate(got), err)
		}
		// The sender can read its own message too: the key is shared.
		if got, err := e2e.OpenDirect(nonce, ct, bobPub, alicePriv); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("OpenDirect by the sender = %q, %v", truncate(got), err)
		}
	}
}

func TestDirectBoxMatchesOneShot(t *testing.T) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	aliceToBob, err := e2e.NewDirectBox(bobPub, alicePriv)
	if err != nil {
		t.Fatal(err)
	}
	bobFromAlice, err := e2e.NewDirectBox(alicePub, bobPriv)
	if err != nil {
		t.Fatal(err)
	}
	if aliceToBob.SharedKey() != bobFromAlice.SharedKey() {
		t.Fatal("the two sides derived different shared keys")
	}
	nonce, ct := aliceToBob.Seal([]byte("via DirectBox"))
	if got, err := e2e.OpenDirect(nonce, ct, alicePub, bobPriv); err != nil || string(got) != "via DirectBox" {
		t.Fatalf("OpenDirect of DirectBox.Seal = %q, %v", got, err)
	}
	nonce, ct, err = e2e.SealDirect([]byte("via SealDirect"), bobPub, alicePriv)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := bobFromAlice.Open(nonce, ct); err != nil || string(got) != "via SealDirect" {
		t.Fatalf("DirectBox.Open of SealDirect = %q, %v", got, err)
	}
}

func TestNoncesAreFresh(t *testing.T) {
	_, alicePriv := testKey("alice")
	bobPub, _ := testKey("bob")
	key := e2e.GenerateMeshKey()
	seen := map[string]bool{}
	for range 64 {
		n1, c1, err := e2e.SealDirect([]byte("same"), bobPub, alicePriv)
		if err != nil {
			t.Fatal(err)
		}
		n2, c2, err := e2e.SealGroup([]byte("same"), key)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{n1, c1, n2, c2} {
			if seen[s] {
				t.Fatalf("repeated nonce or ciphertext %s", s)
			}
			seen[s] = true
		}
	}
}

func TestGroupRoundTrip(t *testing.T) {
	key := e2e.GenerateMeshKey()
	if *key == ([e2e.MeshKeySize]byte{}) {
		t.Fatal("GenerateMeshKey returned the zero key")
	}
	for _, msg := range [][]byte{nil, []byte("to everyone"), pattern(1 << 16)} {
		nonce, ct, err := e2e.SealGroup(msg, key)
		if err != nil {
			t.Fatal(err)
		}
		got, err := e2e.OpenGroup(nonce, ct, key)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("OpenGroup = %q, %v", truncate(got), err)
		}
	}
}

// TestOpenFailures covers every way a direct or group message can be bad.
// All must fail with the documented error and none may panic.
func TestOpenFailures(t *testing.T) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	_, evePriv := testKey("eve")
	nonce, ct, err := e2e.SealDirect([]byte("attack at dawn"), bobPub, alicePriv)
	if err != nil {
		t.Fatal(err)
	}
	key := e2e.GenerateMeshKey()
	gNonce, gCT, err := e2e.SealGroup([]byte("attack at dawn"), key)
	if err != nil {
		t.Fatal(err)
	}

	enc := base64.StdEncoding.EncodeToString
	otherNonce := enc(bytes.Repeat([]byte{7}, e2e.NonceSize))
	// Each mutation applies to a (nonce, ciphertext) pair, direct or group.
	onCT := func(f func(raw []byte) []byte) func(t *testing.T, n, c string) (string, string) {
		return func(t *testing.T, n, c string) (string, string) { return n, enc(f(mustB64(t, c))) }
	}
	onText := func(f func(n, c string) (string, string)) func(t *testing.T, n, c string) (string, string) {
		return func(_ *testing.T, n, c string) (string, string) { return f(n, c) }
	}
	cases := []struct {
		name   string
		mutate func(t *testing.T, nonce, ct string) (string, string)
		want   error
	}{
		{"unchanged", onText(func(n, c string) (string, string) { return n, c }), nil},
		{"wrong_nonce", onText(func(_, c string) (string, string) { return otherNonce, c }), e2e.ErrDecrypt},
		{"truncated_by_one", onCT(func(r []byte) []byte { return r[:len(r)-1] }), e2e.ErrDecrypt},
		{"truncated_to_mac", onCT(func(r []byte) []byte { return r[:e2e.Overhead] }), e2e.ErrDecrypt},
		{"shorter_than_mac", onCT(func(r []byte) []byte { return r[:e2e.Overhead-1] }), e2e.ErrDecrypt},
		{"empty_ciphertext", onCT(func([]byte) []byte { return nil }), e2e.ErrDecrypt},
		{"extended", onCT(func(r []byte) []byte { return append(r, 0) }), e2e.ErrDecrypt},
		{"nonce_23_bytes", onText(func(_, c string) (string, string) { return enc(make([]byte, 23)), c }), e2e.ErrMalformed},
		{"nonce_25_bytes", onText(func(_, c string) (string, string) { return enc(make([]byte, 25)), c }), e2e.ErrMalformed},
		{"nonce_empty", onText(func(_, c string) (string, string) { return "", c }), e2e.ErrMalformed},
		{"nonce_not_base64", onText(func(n, c string) (string, string) { return "!" + n[1:], c }), e2e.ErrMalformed},
		{"nonce_urlsafe_alphabet", onText(func(_, c string) (string, string) { return strings.Repeat("_", 32), c }), e2e.ErrMalformed},
		{"ciphertext_not_base64", onText(func(n, c string) (string, string) { return n, c[:len(c)-4] + "!!!!" }), e2e.ErrMalformed},
		{"ciphertext_unpadded", func(t *testing.T, n, c string) (string, string) {
			return n, strings.TrimRight(enc(mustB64(t, c)[1:]), "=")
		}, e2e.ErrMalformed},
		{"ciphertext_with_newline", onText(func(n, c string) (string, string) { return n, c[:8] + "\n" + c[8:] }), e2e.ErrMalformed},
		{"ciphertext_nonzero_pad_bits", func(t *testing.T, n, c string) (string, string) {
			return n, nonZeroPadBits(t, enc(mustB64(t, c)[1:]))
		}, e2e.ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n, c := tc.mutate(t, nonce, ct)
			_, err := e2e.OpenDirect(n, c, alicePub, bobPriv)
			checkErr(t, "OpenDirect", err, tc.want)
			b, err := e2e.NewDirectBox(alicePub, bobPriv)
			if err != nil {
				t.Fatal(err)
			}
			_, err = b.Open(n, c)
			checkErr(t, "DirectBox.Open", err, tc.want)
			n, c = tc.mutate(t, gNonce, gCT)
			_, err = e2e.OpenGroup(n, c, key)
			checkErr(t, "OpenGroup", err, tc.want)
		})
	}

	t.Run("wrong_keys", func(t *testing.T) {
		for name, open := range map[string]func() ([]byte, error){
			"eve as recipient": func() ([]byte, error) { return e2e.OpenDirect(nonce, ct, alicePub, evePriv) },
			"wrong sender":     func() ([]byte, error) { return e2e.OpenDirect(nonce, ct, bobPub, bobPriv) },
			"wrong mesh key":   func() ([]byte, error) { return e2e.OpenGroup(gNonce, gCT, e2e.GenerateMeshKey()) },
		} {
			_, err := open()
			checkErr(t, name, err, e2e.ErrDecrypt)
		}
	})

	t.Run("every_bit_flip", func(t *testing.T) {
		b, err := e2e.NewDirectBox(alicePub, bobPriv)
		if err != nil {
			t.Fatal(err)
		}
		raw, graw := mustB64(t, ct), mustB64(t, gCT)
		for i := range len(raw) * 8 {
			mut := bytes.Clone(raw)
			mut[i/8] ^= 1 << (i % 8)
			if _, err := b.Open(nonce, enc(mut)); !errors.Is(err, e2e.ErrDecrypt) {
				t.Fatalf("direct: flipping bit %d: %v", i, err)
			}
			gmut := bytes.Clone(graw)
			gmut[i/8] ^= 1 << (i % 8)
			if _, err := e2e.OpenGroup(gNonce, enc(gmut), key); !errors.Is(err, e2e.ErrDecrypt) {
				t.Fatalf("group: flipping bit %d: %v", i, err)
			}
		}
	})

	t.Run("base64_error_is_wrapped", func(t *testing.T) {
		_, err := e2e.OpenDirect(nonce, "@@@@", alicePub, bobPriv)
		var corrupt base64.CorruptInputError
		if !errors.Is(err, e2e.ErrMalformed) || !errors.As(err, &corrupt) {
			t.Fatalf("got %v, want ErrMalformed wrapping base64.CorruptInputError", err)
		}
	})

	t.Run("nil_mesh_key", func(t *testing.T) {
		if _, _, err := e2e.SealGroup([]byte("x"), nil); !errors.Is(err, e2e.ErrInvalidMeshKey) {
			t.Errorf("SealGroup: %v", err)
		}
		if _, err := e2e.OpenGroup(gNonce, gCT, nil); !errors.Is(err, e2e.ErrInvalidMeshKey) {
			t.Errorf("OpenGroup: %v", err)
		}
	})
}

// nonZeroPadBits sets unused low bits in the last base64 character before the
// padding; lenient decoders accept the result, strict ones (and libsodium) do
// not.
func nonZeroPadBits(t *testing.T, s string) string {
	t.Helper()
	i := strings.IndexByte(s, '=') - 1
	if i < 0 {
		t.Fatalf("%q has no padding", s)
	}
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	v := strings.IndexByte(alphabet, s[i])
	return s[:i] + string(alphabet[v|1]) + s[i+1:]
}

func checkErr(t *testing.T, what string, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Errorf("%s: unexpected error %v", what, err)
	case want != nil && !errors.Is(err, want):
		t.Errorf("%s: got error %v, want %v", what, err, want)
	}
}

func mustB64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInvalidKeys(t *testing.T) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	nonce, ct, err := e2e.SealDirect([]byte("x"), bobPub, alicePriv)
	if err != nil {
		t.Fatal(err)
	}
	identity := make([]byte, 32)
	identity[0] = 1
	badPubs := map[string]ed25519.PublicKey{
		"nil":      nil,
		"short":    alicePub[:31],
		"long":     append(bytes.Clone(alicePub), 0),
		"identity": identity,
		"order 4":  make([]byte, 32), // y = 0
		"not on curve": func() []byte {
			b := make([]byte, 32)
			b[0] = 2 // y = 2 is not on the curve
			return b
		}(),
	}
	for name, pub := range badPubs {
		if _, _, err := e2e.SealDirect([]byte("x"), pub, alicePriv); !errors.Is(err, e2e.ErrInvalidPublicKey) {
			t.Errorf("SealDirect to %s key: %v", name, err)
		}
		if _, err := e2e.OpenDirect(nonce, ct, pub, bobPriv); !errors.Is(err, e2e.ErrInvalidPublicKey) {
			t.Errorf("OpenDirect from %s key: %v", name, err)
		}
		if _, err := e2e.NewDirectBox(pub, bobPriv); !errors.Is(err, e2e.ErrInvalidPublicKey) {
			t.Errorf("NewDirectBox with %s key: %v", name, err)
		}
	}
	for name, priv := range map[string]ed25519.PrivateKey{"nil": nil, "seed only": alicePriv.Seed(), "long": append(bytes.Clone(bobPriv), 0)} {
		if _, _, err := e2e.SealDirect([]byte("x"), bobPub, priv); !errors.Is(err, e2e.ErrInvalidSecretKey) {
			t.Errorf("SealDirect from %s secret key: %v", name, err)
		}
		if _, err := e2e.OpenDirect(nonce, ct, alicePub, priv); !errors.Is(err, e2e.ErrInvalidSecretKey) {
			t.Errorf("OpenDirect with %s secret key: %v", name, err)
		}
	}
}

func TestZeroDirectBoxPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("sealing with a zero DirectBox did not panic")
		}
	}()
	var b e2e.DirectBox
	b.Seal([]byte("must not be encrypted under the all-zero key"))
}

// TestConversionsAgree checks that the two conversions describe the same
// X25519 key pair: X25519(sk, basepoint) == converted pk.
func TestConversionsAgree(t *testing.T) {
	for i := range 16 {
		pub, priv := testKey(fmt.Sprint(i))
		xpk, err := e2e.PublicKeyToCurve25519(pub)
		if err != nil {
			t.Fatal(err)
		}
		derived, err := curve25519.X25519(e2e.SecretKeyToCurve25519(priv)[:], curve25519.Basepoint)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(derived, xpk[:]) {
			t.Fatalf("key %d: X25519(sk) = %x, converted pk = %x", i, derived, xpk)
		}
	}
}

func TestSecretKeyToCurve25519PanicsOnBadLength(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("no panic for a 32-byte secret key")
		}
	}()
	e2e.SecretKeyToCurve25519(make(ed25519.PrivateKey, 32))
}

func TestParseKeys(t *testing.T) {
	pub, priv := testKey("alice")
	pubHex, privHex := hex.EncodeToString(pub), hex.EncodeToString(priv)

	for _, s := range []string{pubHex, strings.ToUpper(pubHex)} {
		got, err := e2e.ParsePublicKeyHex(s)
		if err != nil || !got.Equal(pub) {
			t.Errorf("ParsePublicKeyHex(%s) = %x, %v", s, got, err)
		}
	}
	for _, s := range []string{privHex, strings.ToUpper(privHex)} {
		got, err := e2e.ParseSecretKeyHex(s)
		if err != nil || !got.Equal(priv) {
			t.Errorf("ParseSecretKeyHex = %v", err)
		}
	}

	_, otherPriv := testKey("bob")
	mismatched := privHex[:64] + hex.EncodeToString(otherPriv[32:])
	for name, s := range map[string]string{
		"empty":          "",
		"short":          privHex[:126],
		"long":           privHex + "00",
		"not hex":        "zz" + privHex[2:],
		"space":          " " + privHex[1:],
		"pub mismatch":   mismatched,
		"public key hex": pubHex,
	} {
		if _, err := e2e.ParseSecretKeyHex(s); !errors.Is(err, e2e.ErrInvalidSecretKey) {
			t.Errorf("ParseSecretKeyHex(%s): %v, want ErrInvalidSecretKey", name, err)
		}
	}
	for name, s := range map[string]string{
		"empty":   "",
		"short":   pubHex[:62],
		"long":    pubHex + "00",
		"not hex": pubHex[:62] + "gg",
		"0x":      "0x" + pubHex[2:],
	} {
		if _, err := e2e.ParsePublicKeyHex(s); !errors.Is(err, e2e.ErrInvalidPublicKey) {
			t.Errorf("ParsePublicKeyHex(%s): %v, want ErrInvalidPublicKey", name, err)
		}
	}
}

func TestMeshKeyEncodings(t *testing.T) {
	key := e2e.GenerateMeshKey()
	h, b := e2e.EncodeMeshKeyHex(key), e2e.EncodeMeshKeyBase64(key)
	if len(h) != 64 || len(b) != 44 {
		t.Fatalf("encodings have lengths %d and %d", len(h), len(b))
	}
	for _, parse := range []func() (*[e2e.MeshKeySize]byte, error){
		func() (*[e2e.MeshKeySize]byte, error) { return e2e.ParseMeshKeyHex(h) },
		func() (*[e2e.MeshKeySize]byte, error) { return e2e.ParseMeshKeyHex(strings.ToUpper(h)) },
		func() (*[e2e.MeshKeySize]byte, error) { return e2e.ParseMeshKeyBase64(b) },
	} {
		got, err := parse()
		if err != nil || *got != *key {
			t.Errorf("parse = %x, %v; want %x", got, err, key)
		}
	}
	for _, s := range []string{"", h[:62], b[:43], strings.TrimRight(b, "="), base64.StdEncoding.EncodeToString(make([]byte, 31))} {
		_, errH := e2e.ParseMeshKeyHex(s)
		_, errB := e2e.ParseMeshKeyBase64(s)
		if !errors.Is(errH, e2e.ErrInvalidMeshKey) || !errors.Is(errB, e2e.ErrInvalidMeshKey) {
			t.Errorf("parsing %q: %v / %v, want ErrInvalidMeshKey", s, errH, errB)
		}
	}
}

func TestSignVerify(t *testing.T) {
	pub, priv, err := e2e.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	if len(pub) != ed25519.PublicKeySize || len(priv) != ed25519.PrivateKeySize {
		t.Fatalf("key sizes %d, %d", len(pub), len(priv))
	}
	msg := []byte("hello mesh")
	sig := e2e.Sign(priv, msg)
	if !e2e.Verify(pub, msg, sig) {
		t.Fatal("Verify rejected a valid signature")
	}
	if e2e.Verify(pub, []byte("hello mess"), sig) {
		t.Fatal("Verify accepted a signature of another message")
	}
	if e2e.Verify(pub[:31], msg, sig) {
		t.Fatal("Verify accepted a short public key")
	}
	other, _, _ := e2e.GenerateKey()
	if e2e.Verify(other, msg, sig) {
		t.Fatal("Verify accepted another key")
	}
}
