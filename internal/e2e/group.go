package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"

	"golang.org/x/crypto/nacl/secretbox"
)

// GenerateMeshKey returns a new random mesh key, like libsodium's
// crypto_secretbox_keygen.
func GenerateMeshKey() *[MeshKeySize]byte {
	key := new([MeshKeySize]byte)
	rand.Read(key[:]) // never returns an error; see crypto/rand.Read
	return key
}

// ParseMeshKeyHex decodes a mesh key written as 64 hex characters, in either
// case.
func ParseMeshKeyHex(s string) (*[MeshKeySize]byte, error) {
	b, err := decodeHexKey(s, MeshKeySize)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidMeshKey, err)
	}
	return (*[MeshKeySize]byte)(b), nil
}

// ParseMeshKeyBase64 decodes a mesh key written in standard base64 with
// padding (44 characters), the encoding of libsodium's
// to_base64(key, base64_variants.ORIGINAL).
func ParseMeshKeyBase64(s string) (*[MeshKeySize]byte, error) {
	b, err := decodeWire(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidMeshKey, err)
	}
	if len(b) != MeshKeySize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrInvalidMeshKey, len(b), MeshKeySize)
	}
	return (*[MeshKeySize]byte)(b), nil
}

// EncodeMeshKeyHex returns the mesh key as 64 lowercase hex characters.
func EncodeMeshKeyHex(key *[MeshKeySize]byte) string {
	return hex.EncodeToString(key[:])
}

// EncodeMeshKeyBase64 returns the mesh key in standard base64 with padding.
func EncodeMeshKeyBase64(key *[MeshKeySize]byte) string {
	return base64.StdEncoding.EncodeToString(key[:])
}

// SealGroup encrypts plaintext for every holder of meshKey under a fresh
// random nonce, like libsodium's crypto_secretbox_easy, and returns the nonce
// and the ciphertext in standard base64. Random 24-byte nonces are safe for
// any practical number of messages under one key. It fails only if meshKey is
// nil.
func SealGroup(plaintext []byte, meshKey *[MeshKeySize]byte) (nonceB64, ciphertextB64 string, err error) {
	if meshKey == nil {
		return "", "", fmt.Errorf("%w: nil", ErrInvalidMeshKey)
	}
	nonce := randomNonce()
	nonceB64, ciphertextB64 = encodeMessage(nonce, sealGroup(plaintext, nonce, meshKey))
	return nonceB64, ciphertextB64, nil
}

// sealGroup is SealGroup with a caller-chosen nonce, for deterministic test
// vectors. A nonce must never be reused with the same key.
func sealGroup(plaintext []byte, nonce *[NonceSize]byte, meshKey *[MeshKeySize]byte) []byte {
	return secretbox.Seal(nil, plaintext, nonce, meshKey)
}

// OpenGroup authenticates and decrypts a group message, like libsodium's
// crypto_secretbox_open_easy. It returns an error wrapping ErrMalformed if the
// nonce or the ciphertext cannot be decoded, ErrInvalidMeshKey if meshKey is
// nil, and ErrDecrypt if authentication fails.
func OpenGroup(nonceB64, ciphertextB64 string, meshKey *[MeshKeySize]byte) ([]byte, error) {
	if meshKey == nil {
		return nil, fmt.Errorf("%w: nil", ErrInvalidMeshKey)
	}
	nonce, ciphertext, err := decodeMessage(nonceB64, ciphertextB64)
	if err != nil {
		return nil, err
	}
	if len(ciphertext) < Overhead {
		return nil, shortCiphertextError(len(ciphertext))
	}
	plaintext, ok := secretbox.Open(nil, ciphertext, nonce, meshKey)
	if !ok {
		return nil, ErrDecrypt
	}
	return plaintext, nil
}
