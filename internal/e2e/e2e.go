// Package e2e implements claudemesh's end-to-end encryption. Everything it
// produces and accepts is byte-for-byte compatible with libsodium, so Go
// clients interoperate with the TypeScript clients built on
// libsodium-wrappers.
//
// # Keys
//
// A peer's identity is an Ed25519 key pair in libsodium's layout, which is
// also the layout of crypto/ed25519: a 32-byte public key and a 64-byte secret
// key made of the 32-byte seed followed by the public key. In text both are
// lowercase hex (64 and 128 characters). For encryption the Ed25519 keys are
// converted to X25519 keys exactly as libsodium converts them.
//
// # Messages
//
// Direct messages use crypto_box (X25519, XSalsa20, Poly1305); group
// (broadcast) messages use crypto_secretbox (XSalsa20, Poly1305) under a
// 32-byte mesh key shared by all members. Each message carries a fresh random
// 24-byte nonce. On the wire, the nonce and the ciphertext are separate
// standard base64 strings with padding (libsodium's
// base64_variants.ORIGINAL). The ciphertext is the 16-byte Poly1305
// authenticator followed by the encrypted message, the layout of libsodium's
// *_easy functions.
//
// Decoding is strict, so each byte string has exactly one accepted text
// form: padding is required, the unused bits of the last character must be
// zero, and line breaks (which encoding/base64 would otherwise skip) are
// rejected. libsodium decodes the same way.
//
// # Correspondence with libsodium
//
//	Go                              libsodium
//	GenerateKey                     crypto_sign_keypair
//	Sign                            crypto_sign_detached
//	Verify                          crypto_sign_verify_detached (see Verify)
//	PublicKeyToCurve25519           crypto_sign_ed25519_pk_to_curve25519
//	SecretKeyToCurve25519           crypto_sign_ed25519_sk_to_curve25519
//	NewDirectBox                    both conversions, then crypto_box_beforenm
//	SealDirect, DirectBox.Seal      crypto_box_easy, crypto_box_easy_afternm
//	OpenDirect, DirectBox.Open      crypto_box_open_easy, crypto_box_open_easy_afternm
//	GenerateMeshKey                 crypto_secretbox_keygen
//	SealGroup                       crypto_secretbox_easy
//	OpenGroup                       crypto_secretbox_open_easy
//
// The interop is checked by the tests against vectors that libsodium itself
// produced (testdata/libsodium_vectors.json). Vectors that Go produced
// (testdata/go_vectors.json) have been opened by libsodium. The generator
// and verifier is testdata/gen/gen.mjs.
package e2e

import (
	"crypto/ed25519"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"

	"filippo.io/edwards25519"
)

// Sizes of the values handled by this package, in bytes.
const (
	// NonceSize is the size of a crypto_box or crypto_secretbox nonce.
	NonceSize = 24
	// MeshKeySize is the size of a mesh (group) key.
	MeshKeySize = 32
	// Overhead is how much longer a ciphertext is than its plaintext: the
	// Poly1305 authenticator.
	Overhead = 16
)

var (
	// ErrDecrypt is returned when a ciphertext fails authentication. The
	// message was forged or corrupted, was encrypted for another key, is
	// truncated, or is paired with the wrong nonce. As in libsodium, these
	// cases look the same.
	ErrDecrypt = errors.New("e2e: decryption failed: message forged, corrupted or not encrypted for this key")

	// ErrMalformed is returned when a nonce or ciphertext is not valid
	// base64, or when a nonce has the wrong length. The returned error also
	// wraps the underlying base64 error, if there is one.
	ErrMalformed = errors.New("e2e: malformed message")

	// ErrInvalidPublicKey is returned for an Ed25519 public key that is not
	// 32 bytes long or that libsodium would refuse to convert to X25519.
	ErrInvalidPublicKey = errors.New("e2e: invalid ed25519 public key")

	// ErrInvalidSecretKey is returned for an Ed25519 secret key that is not
	// 64 bytes long, or whose second half does not match its seed.
	ErrInvalidSecretKey = errors.New("e2e: invalid ed25519 secret key")

	// ErrInvalidMeshKey is returned for a missing or malformed mesh key.
	ErrInvalidMeshKey = errors.New("e2e: invalid mesh key")
)

// GenerateKey returns a new random Ed25519 key pair, like libsodium's
// crypto_sign_keypair.
func GenerateKey() (ed25519.PublicKey, ed25519.PrivateKey, error) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil, nil, fmt.Errorf("e2e: generating key pair: %w", err)
	}
	return pub, priv, nil
}

// ParsePublicKeyHex decodes an Ed25519 public key written as 64 hex
// characters, in either case. It checks only the syntax. PublicKeyToCurve25519
// also checks that the key is a point libsodium accepts.
func ParsePublicKeyHex(s string) (ed25519.PublicKey, error) {
	b, err := decodeHexKey(s, ed25519.PublicKeySize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidPublicKey, err)
	}
	return ed25519.PublicKey(b), nil
}

// ParseSecretKeyHex decodes an Ed25519 secret key (seed || public key)
// written as 128 hex characters, in either case. It returns an error if the
// public key half is not the one derived from the seed.
func ParseSecretKeyHex(s string) (ed25519.PrivateKey, error) {
	b, err := decodeHexKey(s, ed25519.PrivateKeySize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidSecretKey, err)
	}
	priv := ed25519.NewKeyFromSeed(b[:ed25519.SeedSize])
	if subtle.ConstantTimeCompare(priv[ed25519.SeedSize:], b[ed25519.SeedSize:]) != 1 {
		return nil, fmt.Errorf("%w: public key half does not match the seed", ErrInvalidSecretKey)
	}
	clear(b)
	return priv, nil
}

func decodeHexKey(s string, size int) ([]byte, error) {
	if len(s) != 2*size {
		return nil, fmt.Errorf("want %d hex characters, got %d", 2*size, len(s))
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("decoding hex: %w", err)
	}
	return b, nil
}

// Sign signs msg with priv, like libsodium's crypto_sign_detached. Ed25519
// signatures are deterministic, so both produce identical signatures. Sign
// panics if len(priv) is not ed25519.PrivateKeySize, like ed25519.Sign.
func Sign(priv ed25519.PrivateKey, msg []byte) []byte {
	return ed25519.Sign(priv, msg)
}

// Verify reports whether sig is a valid signature of msg by pub. It is
// crypto/ed25519's Verify. libsodium's crypto_sign_verify_detached
// additionally rejects signatures whose R or public key has small order or a
// non-canonical encoding. No honestly generated key or signature is ever
// affected, so for genuine messages the two always agree.
func Verify(pub ed25519.PublicKey, msg, sig []byte) bool {
	return len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, msg, sig)
}

// PublicKeyToCurve25519 converts an Ed25519 public key to the X25519 public
// key of the same peer, exactly like libsodium's
// crypto_sign_ed25519_pk_to_curve25519 (libsodium 1.0.21 and later): the
// result is the Montgomery u = (1+y)/(1-y) of the Edwards point.
//
// It rejects the keys libsodium rejects: encodings that are not a point on
// the curve, points of small order (including the identity), and points with
// a torsion component (outside the prime-order subgroup). As in libsodium, the
// sign bit of x is ignored, so A and -A convert to the same key. libsodium
// does not check that an encoding is canonical (y < p), but no non-canonical
// encoding decodes to a prime-order point, so none is accepted.
func PublicKeyToCurve25519(pub ed25519.PublicKey) (*[32]byte, error) {
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: want %d bytes, got %d", ErrInvalidPublicKey, ed25519.PublicKeySize, len(pub))
	}
	// SetBytes, like libsodium's ge25519_frombytes_negate_vartime, accepts
	// y >= p and the "negative zero" x, and fails only for non-points.
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: not a point on the curve", ErrInvalidPublicKey)
	}
	identity := edwards25519.NewIdentityPoint()
	// libsodium's ge25519_has_small_order.
	if new(edwards25519.Point).MultByCofactor(p).Equal(identity) == 1 {
		return nil, fmt.Errorf("%w: point of small order", ErrInvalidPublicKey)
	}
	// libsodium's ge25519_is_on_main_subgroup: [L]P must be the identity.
	// Before 1.0.21 libsodium only checked that x([L]P) = 0, which also
	// accepted points with an order-2 component. We follow the current check.
	if !inPrimeOrderSubgroup(p) {
		return nil, fmt.Errorf("%w: point has a torsion component (not in the prime-order subgroup)", ErrInvalidPublicKey)
	}
	out := new([32]byte)
	copy(out[:], p.BytesMontgomery())
	return out, nil
}

// inPrimeOrderSubgroup reports whether [L]p is the identity, where L is the
// order of the base point. Scalars are reduced mod L, so [L]p is computed as
// [L-1]p + p. The canonical representative of L-1 is used as an integer, so
// any torsion component of p survives.
func inPrimeOrderSubgroup(p *edwards25519.Point) bool {
	var oneBytes [32]byte
	oneBytes[0] = 1
	one, err := edwards25519.NewScalar().SetCanonicalBytes(oneBytes[:])
	if err != nil {
		panic("e2e: encoding of scalar 1 rejected: " + err.Error())
	}
	lMinusOne := edwards25519.NewScalar().Negate(one)
	q := new(edwards25519.Point).VarTimeDoubleScalarBaseMult(lMinusOne, p, edwards25519.NewScalar())
	q.Add(q, p)
	return q.Equal(edwards25519.NewIdentityPoint()) == 1
}

// SecretKeyToCurve25519 converts an Ed25519 secret key to the X25519 secret
// key of the same peer, exactly like libsodium's
// crypto_sign_ed25519_sk_to_curve25519: the first 32 bytes of
// SHA-512(seed), clamped. This is also the scalar Ed25519 itself derives from
// the seed. Like libsodium, it reads only the seed (the first 32 bytes).
// Like ed25519.Sign, it panics if len(priv) is not ed25519.PrivateKeySize.
func SecretKeyToCurve25519(priv ed25519.PrivateKey) *[32]byte {
	if l := len(priv); l != ed25519.PrivateKeySize {
		panic("e2e: bad ed25519 private key length: " + strconv.Itoa(l))
	}
	h := sha512.Sum512(priv[:ed25519.SeedSize])
	out := new([32]byte)
	copy(out[:], h[:32])
	clear(h[:])
	out[0] &= 248
	out[31] &= 127
	out[31] |= 64
	return out
}
