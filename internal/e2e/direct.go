package e2e

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"strings"

	"golang.org/x/crypto/nacl/box"
)

// DirectBox encrypts and decrypts direct messages between one local peer and
// one remote peer. It holds their precomputed crypto_box shared key, so the
// key conversions and the X25519 operation are paid once in NewDirectBox, not
// once per message. A client sending many messages to the same peer should
// keep a DirectBox for that peer.
//
// The shared key is symmetric: the recipient's DirectBox (sender's public key,
// own secret key) opens what the sender's DirectBox (recipient's public key,
// own secret key) sealed. A DirectBox is safe for concurrent use. The zero
// value is not usable: create DirectBoxes with NewDirectBox.
type DirectBox struct {
	shared [32]byte
}

// key returns the shared key, refusing to encrypt or decrypt under the
// all-zero key of a DirectBox that did not come from NewDirectBox.
func (b *DirectBox) key() *[32]byte {
	if b.shared == ([32]byte{}) {
		panic("e2e: DirectBox used without NewDirectBox")
	}
	return &b.shared
}

// NewDirectBox precomputes the shared key between the local peer, identified
// by its Ed25519 secret key self, and the remote peer, identified by its
// Ed25519 public key peer. It converts both keys to X25519 (see
// PublicKeyToCurve25519 and SecretKeyToCurve25519) and then does what
// libsodium's crypto_box_beforenm does.
//
// crypto_box_beforenm also rejects an all-zero X25519 result. That cannot
// happen here: PublicKeyToCurve25519 returns only points of prime order L,
// and a clamped X25519 scalar, a multiple of 8 below 2^255, is never a
// multiple of L.
func NewDirectBox(peer ed25519.PublicKey, self ed25519.PrivateKey) (*DirectBox, error) {
	if len(self) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("%w: want %d bytes, got %d", ErrInvalidSecretKey, ed25519.PrivateKeySize, len(self))
	}
	peerX, err := PublicKeyToCurve25519(peer)
	if err != nil {
		return nil, err
	}
	selfX := SecretKeyToCurve25519(self)
	defer clear(selfX[:])
	b := new(DirectBox)
	box.Precompute(&b.shared, peerX, selfX)
	return b, nil
}

// Seal encrypts plaintext for the remote peer under a fresh random nonce,
// like libsodium's crypto_box_easy_afternm, and returns the nonce and the
// ciphertext in standard base64.
func (b *DirectBox) Seal(plaintext []byte) (nonceB64, ciphertextB64 string) {
	nonce := randomNonce()
	return encodeMessage(nonce, b.seal(plaintext, nonce))
}

// seal is Seal with a caller-chosen nonce, for deterministic test vectors. A
// nonce must never be reused with the same key.
func (b *DirectBox) seal(plaintext []byte, nonce *[NonceSize]byte) []byte {
	return box.SealAfterPrecomputation(nil, plaintext, nonce, b.key())
}

// Open authenticates and decrypts a message from the remote peer, like
// libsodium's crypto_box_open_easy_afternm. It returns an error wrapping
// ErrMalformed if the nonce or the ciphertext cannot be decoded, and one
// wrapping ErrDecrypt if authentication fails.
func (b *DirectBox) Open(nonceB64, ciphertextB64 string) ([]byte, error) {
	nonce, ciphertext, err := decodeMessage(nonceB64, ciphertextB64)
	if err != nil {
		return nil, err
	}
	return b.open(nonce, ciphertext)
}

func (b *DirectBox) open(nonce *[NonceSize]byte, ciphertext []byte) ([]byte, error) {
	if len(ciphertext) < Overhead {
		return nil, shortCiphertextError(len(ciphertext))
	}
	plaintext, ok := box.OpenAfterPrecomputation(nil, ciphertext, nonce, b.key())
	if !ok {
		return nil, ErrDecrypt
	}
	return plaintext, nil
}

// SealDirect encrypts plaintext from sender to recipient under a fresh random
// nonce. It does the same as libsodium's
//
//	crypto_box_easy(plaintext, nonce,
//	    crypto_sign_ed25519_pk_to_curve25519(recipient),
//	    crypto_sign_ed25519_sk_to_curve25519(sender))
//
// and returns the nonce and the ciphertext in standard base64. It fails only
// if recipient is not a valid public key or sender has the wrong length. To
// send several messages to one peer, use a DirectBox.
func SealDirect(plaintext []byte, recipient ed25519.PublicKey, sender ed25519.PrivateKey) (nonceB64, ciphertextB64 string, err error) {
	b, err := NewDirectBox(recipient, sender)
	if err != nil {
		return "", "", err
	}
	nonceB64, ciphertextB64 = b.Seal(plaintext)
	return nonceB64, ciphertextB64, nil
}

// OpenDirect authenticates and decrypts a message that sender sealed for
// recipient. It is libsodium's crypto_box_open_easy applied to the converted
// keys. It returns an error wrapping ErrMalformed for undecodable input,
// ErrInvalidPublicKey or ErrInvalidSecretKey for bad keys, and ErrDecrypt if
// authentication fails.
func OpenDirect(nonceB64, ciphertextB64 string, sender ed25519.PublicKey, recipient ed25519.PrivateKey) ([]byte, error) {
	nonce, ciphertext, err := decodeMessage(nonceB64, ciphertextB64)
	if err != nil {
		return nil, err
	}
	b, err := NewDirectBox(sender, recipient)
	if err != nil {
		return nil, err
	}
	return b.open(nonce, ciphertext)
}

// wireEncoding is the wire encoding of nonces and ciphertexts: standard
// base64 with padding, rejecting non-zero trailing bits.
var wireEncoding = base64.StdEncoding.Strict()

func randomNonce() *[NonceSize]byte {
	nonce := new([NonceSize]byte)
	rand.Read(nonce[:]) // never returns an error; see crypto/rand.Read
	return nonce
}

func encodeMessage(nonce *[NonceSize]byte, ciphertext []byte) (nonceB64, ciphertextB64 string) {
	return wireEncoding.EncodeToString(nonce[:]), wireEncoding.EncodeToString(ciphertext)
}

func decodeMessage(nonceB64, ciphertextB64 string) (*[NonceSize]byte, []byte, error) {
	nonce, err := decodeWire(nonceB64)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: nonce: %w", ErrMalformed, err)
	}
	if len(nonce) != NonceSize {
		return nil, nil, fmt.Errorf("%w: nonce is %d bytes, want %d", ErrMalformed, len(nonce), NonceSize)
	}
	ciphertext, err := decodeWire(ciphertextB64)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: ciphertext: %w", ErrMalformed, err)
	}
	return (*[NonceSize]byte)(nonce), ciphertext, nil
}

// decodeWire decodes strict standard base64. encoding/base64 skips '\r' and
// '\n'; libsodium does not, and neither do we, so that every byte string has
// exactly one accepted encoding.
func decodeWire(s string) ([]byte, error) {
	if i := strings.IndexAny(s, "\r\n"); i >= 0 {
		return nil, base64.CorruptInputError(i)
	}
	return wireEncoding.DecodeString(s)
}

func shortCiphertextError(n int) error {
	return fmt.Errorf("%w (ciphertext is %d bytes, shorter than the %d-byte authenticator)", ErrDecrypt, n, Overhead)
}
