package e2e

import "crypto/ed25519"

// Deterministic variants for the black-box tests in package e2e_test. They
// take an explicit nonce so that fixtures can be compared byte for byte.

// SealDirectWithNonce is SealDirect with a caller-chosen nonce; it returns
// the base64 ciphertext.
func SealDirectWithNonce(plaintext []byte, nonce *[NonceSize]byte, recipient ed25519.PublicKey, sender ed25519.PrivateKey) (string, error) {
	b, err := NewDirectBox(recipient, sender)
	if err != nil {
		return "", err
	}
	return b.SealWithNonce(plaintext, nonce), nil
}

// SealWithNonce is Seal with a caller-chosen nonce; it returns the base64
// ciphertext.
func (b *DirectBox) SealWithNonce(plaintext []byte, nonce *[NonceSize]byte) string {
	return wireEncoding.EncodeToString(b.seal(plaintext, nonce))
}

// SharedKey returns the precomputed key, to compare with crypto_box_beforenm.
func (b *DirectBox) SharedKey() [32]byte { return b.shared }

// SealGroupWithNonce is SealGroup with a caller-chosen nonce; it returns the
// base64 ciphertext.
func SealGroupWithNonce(plaintext []byte, nonce *[NonceSize]byte, meshKey *[MeshKeySize]byte) string {
	return wireEncoding.EncodeToString(sealGroup(plaintext, nonce, meshKey))
}
