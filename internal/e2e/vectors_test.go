package e2e_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/claudemesh/broker/internal/e2e"
)

// Fixtures shared with testdata/gen/gen.mjs. Binary values are hex (keys,
// signatures) or standard base64 (nonces, plaintexts, ciphertexts: the wire
// format).
type (
	vectorKeypair struct {
		Seed       string `json:"seed"`
		Ed25519PK  string `json:"ed25519_pk"`
		Ed25519SK  string `json:"ed25519_sk"`
		X25519PK   string `json:"x25519_pk"`
		X25519SK   string `json:"x25519_sk"`
		SigMessage string `json:"sig_message,omitempty"`
		Signature  string `json:"signature,omitempty"`
	}
	vectorBox struct {
		Name        string `json:"name"`
		Sender      int    `json:"sender"`
		Recipient   int    `json:"recipient"`
		RandomNonce bool   `json:"random_nonce,omitempty"`
		SharedKey   string `json:"shared_key,omitempty"`
		Via         string `json:"via,omitempty"`
		Nonce       string `json:"nonce"`
		Plaintext   string `json:"plaintext"`
		Ciphertext  string `json:"ciphertext"`
	}
	vectorSecretbox struct {
		Name        string `json:"name"`
		RandomNonce bool   `json:"random_nonce,omitempty"`
		Key         string `json:"key"`
		Nonce       string `json:"nonce"`
		Plaintext   string `json:"plaintext"`
		Ciphertext  string `json:"ciphertext"`
	}
	vectorPKConversion struct {
		Name      string `json:"name"`
		Ed25519PK string `json:"ed25519_pk"`
		OK        bool   `json:"ok"`
		X25519PK  string `json:"x25519_pk"`
	}
	vectorSignature struct {
		Signer    int    `json:"signer"`
		Message   string `json:"message"`
		Signature string `json:"signature"`
	}
	libsodiumVectors struct {
		LibsodiumVersion  string               `json:"libsodium_version"`
		Keypairs          []vectorKeypair      `json:"keypairs"`
		Box               []vectorBox          `json:"box"`
		BoxMustFail       []vectorBox          `json:"box_must_fail"`
		Secretbox         []vectorSecretbox    `json:"secretbox"`
		SecretboxMustFail []vectorSecretbox    `json:"secretbox_must_fail"`
		PKToCurve25519    []vectorPKConversion `json:"pk_to_curve25519"`
		Base64Decoding    []struct {
			Input string `json:"input"`
			OK    bool   `json:"ok"`
		} `json:"base64_decoding"`
	}
	goVectors struct {
		Comment    string            `json:"comment"`
		Keypairs   []vectorKeypair   `json:"keypairs"`
		Signatures []vectorSignature `json:"signatures"`
		Box        []vectorBox       `json:"box"`
		Secretbox  []vectorSecretbox `json:"secretbox"`
	}
)

const (
	libsodiumVectorsFile = "testdata/libsodium_vectors.json"
	goVectorsFile        = "testdata/go_vectors.json"
)

func loadJSON[T any](t testing.TB, path string) *T {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading fixtures: %v", err)
	}
	v := new(T)
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("parsing %s: %v", path, err)
	}
	return v
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in fixture %q: %v", s, err)
	}
	return b
}

func unb64(t testing.TB, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatalf("bad base64 in fixture %q: %v", s, err)
	}
	return b
}

func nonceOf(t testing.TB, s string) *[e2e.NonceSize]byte {
	t.Helper()
	b := unb64(t, s)
	if len(b) != e2e.NonceSize {
		t.Fatalf("fixture nonce is %d bytes", len(b))
	}
	return (*[e2e.NonceSize]byte)(b)
}

func meshKeyOf(t testing.TB, s string) *[e2e.MeshKeySize]byte {
	t.Helper()
	k, err := e2e.ParseMeshKeyHex(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type parsedKeypair struct {
	pub  ed25519.PublicKey
	priv ed25519.PrivateKey
}

// checkKeypairs checks the Go side of each fixture key pair and returns the
// parsed keys.
func checkKeypairs(t *testing.T, kps []vectorKeypair) []parsedKeypair {
	t.Helper()
	out := make([]parsedKeypair, len(kps))
	for i, kp := range kps {
		pub, err := e2e.ParsePublicKeyHex(kp.Ed25519PK)
		if err != nil {
			t.Fatalf("keypair %d: %v", i, err)
		}
		priv, err := e2e.ParseSecretKeyHex(kp.Ed25519SK)
		if err != nil {
			t.Fatalf("keypair %d: %v", i, err)
		}
		if got := ed25519.NewKeyFromSeed(unhex(t, kp.Seed)); !got.Equal(priv) {
			t.Errorf("keypair %d: secret key from seed = %x, want %s", i, got, kp.Ed25519SK)
		}
		if !bytes.Equal(priv.Public().(ed25519.PublicKey), pub) {
			t.Errorf("keypair %d: public key does not match secret key", i)
		}
		xpk, err := e2e.PublicKeyToCurve25519(pub)
		if err != nil {
			t.Fatalf("keypair %d: PublicKeyToCurve25519: %v", i, err)
		}
		if got := hex.EncodeToString(xpk[:]); got != kp.X25519PK {
			t.Errorf("keypair %d: PublicKeyToCurve25519 = %s, want %s", i, got, kp.X25519PK)
		}
		if got := hex.EncodeToString(e2e.SecretKeyToCurve25519(priv)[:]); got != kp.X25519SK {
			t.Errorf("keypair %d: SecretKeyToCurve25519 = %s, want %s", i, got, kp.X25519SK)
		}
		if kp.Signature != "" {
			msg := unb64(t, kp.SigMessage)
			if got := hex.EncodeToString(e2e.Sign(priv, msg)); got != kp.Signature {
				t.Errorf("keypair %d: Sign = %s, want %s", i, got, kp.Signature)
			}
			if !e2e.Verify(pub, msg, unhex(t, kp.Signature)) {
				t.Errorf("keypair %d: Verify rejected the fixture signature", i)
			}
		}
		out[i] = parsedKeypair{pub, priv}
	}
	return out
}

func TestLibsodiumVectors(t *testing.T) {
	v := loadJSON[libsodiumVectors](t, libsodiumVectorsFile)
	t.Logf("fixtures from libsodium %s", v.LibsodiumVersion)
	keys := checkKeypairs(t, v.Keypairs)

	t.Run("box", func(t *testing.T) {
		for _, tc := range v.Box {
			sender, recipient := keys[tc.Sender], keys[tc.Recipient]
			plaintext := unb64(t, tc.Plaintext)

			// Go → libsodium: same nonce, same bytes as crypto_box_easy.
			ct, err := e2e.SealDirectWithNonce(plaintext, nonceOf(t, tc.Nonce), recipient.pub, sender.priv)
			if err != nil {
				t.Fatalf("%s: SealDirectWithNonce: %v", tc.Name, err)
			}
			if ct != tc.Ciphertext {
				t.Errorf("%s: Go ciphertext differs from crypto_box_easy", tc.Name)
			}
			senderBox, err := e2e.NewDirectBox(recipient.pub, sender.priv)
			if err != nil {
				t.Fatal(err)
			}
			if k := senderBox.SharedKey(); hex.EncodeToString(k[:]) != tc.SharedKey {
				t.Errorf("%s: precomputed key differs from crypto_box_beforenm", tc.Name)
			}
			if got := senderBox.SealWithNonce(plaintext, nonceOf(t, tc.Nonce)); got != tc.Ciphertext {
				t.Errorf("%s: DirectBox ciphertext differs from crypto_box_easy", tc.Name)
			}

			// libsodium → Go.
			got, err := e2e.OpenDirect(tc.Nonce, tc.Ciphertext, sender.pub, recipient.priv)
			if err != nil || !bytes.Equal(got, plaintext) {
				t.Errorf("%s: OpenDirect = %q, %v", tc.Name, truncate(got), err)
			}
			recipientBox, err := e2e.NewDirectBox(sender.pub, recipient.priv)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := recipientBox.Open(tc.Nonce, tc.Ciphertext); err != nil || !bytes.Equal(got, plaintext) {
				t.Errorf("%s: DirectBox.Open = %q, %v", tc.Name, truncate(got), err)
			}
		}
	})

	t.Run("box_must_fail", func(t *testing.T) {
		for _, tc := range v.BoxMustFail {
			got, err := e2e.OpenDirect(tc.Nonce, tc.Ciphertext, keys[tc.Sender].pub, keys[tc.Recipient].priv)
			if !errors.Is(err, e2e.ErrDecrypt) {
				t.Errorf("%s: OpenDirect = %q, %v; want ErrDecrypt", tc.Name, truncate(got), err)
			}
		}
	})

	t.Run("secretbox", func(t *testing.T) {
		for _, tc := range v.Secretbox {
			key := meshKeyOf(t, tc.Key)
			plaintext := unb64(t, tc.Plaintext)
			if ct := e2e.SealGroupWithNonce(plaintext, nonceOf(t, tc.Nonce), key); ct != tc.Ciphertext {
				t.Errorf("%s: Go ciphertext differs from crypto_secretbox_easy", tc.Name)
			}
			if got, err := e2e.OpenGroup(tc.Nonce, tc.Ciphertext, key); err != nil || !bytes.Equal(got, plaintext) {
				t.Errorf("%s: OpenGroup = %q, %v", tc.Name, truncate(got), err)
			}
		}
	})

	t.Run("secretbox_must_fail", func(t *testing.T) {
		for _, tc := range v.SecretboxMustFail {
			got, err := e2e.OpenGroup(tc.Nonce, tc.Ciphertext, meshKeyOf(t, tc.Key))
			if !errors.Is(err, e2e.ErrDecrypt) {
				t.Errorf("%s: OpenGroup = %q, %v; want ErrDecrypt", tc.Name, truncate(got), err)
			}
		}
	})

	t.Run("pk_to_curve25519", func(t *testing.T) {
		var accepted, rejected int
		for _, tc := range v.PKToCurve25519 {
			got, err := e2e.PublicKeyToCurve25519(unhex(t, tc.Ed25519PK))
			switch {
			case tc.OK && err != nil:
				t.Errorf("%s (%s): libsodium accepts, Go rejects: %v", tc.Name, tc.Ed25519PK, err)
			case !tc.OK && err == nil:
				t.Errorf("%s (%s): libsodium rejects, Go accepts as %x", tc.Name, tc.Ed25519PK, got[:])
			case tc.OK && hex.EncodeToString(got[:]) != tc.X25519PK:
				t.Errorf("%s: Go converts to %x, libsodium to %s", tc.Name, got, tc.X25519PK)
			case !tc.OK && !errors.Is(err, e2e.ErrInvalidPublicKey):
				t.Errorf("%s: error %v does not wrap ErrInvalidPublicKey", tc.Name, err)
			}
			if tc.OK {
				accepted++
			} else {
				rejected++
			}
		}
		t.Logf("%d keys accepted and %d rejected, as by libsodium", accepted, rejected)
	})

	// Go decodes the wire base64 exactly when libsodium's from_base64
	// (base64_variants.ORIGINAL) does: such ciphertexts fail authentication,
	// the others are malformed.
	t.Run("base64_decoding", func(t *testing.T) {
		key := e2e.GenerateMeshKey()
		nonce, _, err := e2e.SealGroup(nil, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range v.Base64Decoding {
			_, err := e2e.OpenGroup(nonce, tc.Input, key)
			if tc.OK && !errors.Is(err, e2e.ErrDecrypt) || !tc.OK && !errors.Is(err, e2e.ErrMalformed) {
				t.Errorf("ciphertext %q: libsodium decodes: %v; Go: %v", tc.Input, tc.OK, err)
			}
		}
	})
}

// TestGoVectors checks that the committed Go → libsodium vectors (which
// libsodium has opened, see gen.mjs --verify) still open in Go.
func TestGoVectors(t *testing.T) {
	checkGoVectors(t, goVectorsFile)
}

// checkGoVectors opens every item of a go_vectors file with the Go code.
func checkGoVectors(t *testing.T, file string) {
	t.Helper()
	v := loadJSON[goVectors](t, file)
	keys := checkKeypairs(t, v.Keypairs)
	for i, s := range v.Signatures {
		if !e2e.Verify(keys[s.Signer].pub, unb64(t, s.Message), unhex(t, s.Signature)) {
			t.Errorf("signature %d does not verify", i)
		}
	}
	for _, tc := range v.Box {
		got, err := e2e.OpenDirect(tc.Nonce, tc.Ciphertext, keys[tc.Sender].pub, keys[tc.Recipient].priv)
		if err != nil || !bytes.Equal(got, unb64(t, tc.Plaintext)) {
			t.Errorf("box %s: OpenDirect = %q, %v", tc.Name, truncate(got), err)
		}
	}
	for _, tc := range v.Secretbox {
		got, err := e2e.OpenGroup(tc.Nonce, tc.Ciphertext, meshKeyOf(t, tc.Key))
		if err != nil || !bytes.Equal(got, unb64(t, tc.Plaintext)) {
			t.Errorf("secretbox %s: OpenGroup = %q, %v", tc.Name, truncate(got), err)
		}
	}
}

// TestWriteGoVectors seals a fresh set of Go vectors with the production
// code paths (random nonces) and checks they open. With
// E2E_WRITE_GO_VECTORS=1 it replaces testdata/go_vectors.json, which
// libsodium then checks with
//
//	node testdata/gen/gen.mjs --verify testdata/go_vectors.json
func TestWriteGoVectors(t *testing.T) {
	v := goVectors{Comment: "Generated by TestWriteGoVectors (internal/e2e); verified with testdata/gen/gen.mjs --verify."}
	var keys []parsedKeypair
	for i := range 3 {
		seed := sha256.Sum256(fmt.Appendf(nil, "claudemesh go vector keypair %d", i))
		priv := ed25519.NewKeyFromSeed(seed[:])
		pub := priv.Public().(ed25519.PublicKey)
		xpk, err := e2e.PublicKeyToCurve25519(pub)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, parsedKeypair{pub, priv})
		v.Keypairs = append(v.Keypairs, vectorKeypair{
			Seed:      hex.EncodeToString(seed[:]),
			Ed25519PK: hex.EncodeToString(pub),
			Ed25519SK: hex.EncodeToString(priv),
			X25519PK:  hex.EncodeToString(xpk[:]),
			X25519SK:  hex.EncodeToString(e2e.SecretKeyToCurve25519(priv)[:]),
		})
		msg := fmt.Appendf(nil, "signed by go keypair %d ✍", i)
		v.Signatures = append(v.Signatures, vectorSignature{
			Signer:    i,
			Message:   base64.StdEncoding.EncodeToString(msg),
			Signature: hex.EncodeToString(e2e.Sign(priv, msg)),
		})
	}
	plaintexts := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"ascii", []byte("hello from the Go client")},
		{"unicode", []byte("héllo wörld — 你好, мир 👋🏽 ∑∞ \x00 end")},
		{"binary_33", pattern(33)},
		{"binary_97", pattern(97)},
		{"binary_4KiB", pattern(4096)},
	}
	pairs := [][2]int{{0, 1}, {1, 0}, {1, 2}, {2, 2}}
	for i, p := range plaintexts {
		s, r := pairs[i%len(pairs)][0], pairs[i%len(pairs)][1]
		nonce, ct, err := e2e.SealDirect(p.data, keys[r].pub, keys[s].priv)
		if err != nil {
			t.Fatal(err)
		}
		v.Box = append(v.Box, vectorBox{Name: p.name, Sender: s, Recipient: r, Via: "SealDirect",
			Nonce: nonce, Plaintext: base64.StdEncoding.EncodeToString(p.data), Ciphertext: ct})
		b, err := e2e.NewDirectBox(keys[s].pub, keys[r].priv) // the other direction
		if err != nil {
			t.Fatal(err)
		}
		nonce, ct = b.Seal(p.data)
		v.Box = append(v.Box, vectorBox{Name: p.name, Sender: r, Recipient: s, Via: "DirectBox.Seal",
			Nonce: nonce, Plaintext: base64.StdEncoding.EncodeToString(p.data), Ciphertext: ct})
	}
	for _, p := range plaintexts {
		key := e2e.GenerateMeshKey()
		nonce, ct, err := e2e.SealGroup(p.data, key)
		if err != nil {
			t.Fatal(err)
		}
		v.Secretbox = append(v.Secretbox, vectorSecretbox{Name: p.name, Key: e2e.EncodeMeshKeyHex(key),
			Nonce: nonce, Plaintext: base64.StdEncoding.EncodeToString(p.data), Ciphertext: ct})
	}
	data, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "go_vectors.json")
	write := os.Getenv("E2E_WRITE_GO_VECTORS") == "1"
	if write {
		path = filepath.FromSlash(goVectorsFile)
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	checkGoVectors(t, path)
	if write {
		t.Logf("wrote %s; now run: node testdata/gen/gen.mjs --verify %s", path, goVectorsFile)
	}
}

// pattern returns n deterministic, non-repeating-looking bytes.
func pattern(n int) []byte {
	out := make([]byte, 0, n+sha256.Size)
	block := sha256.Sum256([]byte("claudemesh e2e pattern"))
	for len(out) < n {
		out = append(out, block[:]...)
		block = sha256.Sum256(block[:])
	}
	return out[:n]
}

// truncate keeps failure messages short for large plaintexts.
func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}
