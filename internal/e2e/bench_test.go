package e2e_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/e2e"
)

const benchPayload = 1024

func BenchmarkSealDirect(b *testing.B) {
	_, alicePriv := testKey("alice")
	bobPub, _ := testKey("bob")
	msg := pattern(benchPayload)
	b.SetBytes(benchPayload)
	for b.Loop() {
		if _, _, err := e2e.SealDirect(msg, bobPub, alicePriv); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpenDirect(b *testing.B) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	nonce, ct, err := e2e.SealDirect(pattern(benchPayload), bobPub, alicePriv)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(benchPayload)
	for b.Loop() {
		if _, err := e2e.OpenDirect(nonce, ct, alicePub, bobPriv); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkNewDirectBox is the one-off cost a DirectBox saves per message:
// two key conversions and one X25519.
func BenchmarkNewDirectBox(b *testing.B) {
	_, alicePriv := testKey("alice")
	bobPub, _ := testKey("bob")
	for b.Loop() {
		if _, err := e2e.NewDirectBox(bobPub, alicePriv); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDirectBoxSeal(b *testing.B) {
	_, alicePriv := testKey("alice")
	bobPub, _ := testKey("bob")
	box, err := e2e.NewDirectBox(bobPub, alicePriv)
	if err != nil {
		b.Fatal(err)
	}
	msg := pattern(benchPayload)
	b.SetBytes(benchPayload)
	for b.Loop() {
		box.Seal(msg)
	}
}

func BenchmarkDirectBoxOpen(b *testing.B) {
	alicePub, alicePriv := testKey("alice")
	bobPub, bobPriv := testKey("bob")
	nonce, ct, err := e2e.SealDirect(pattern(benchPayload), bobPub, alicePriv)
	if err != nil {
		b.Fatal(err)
	}
	box, err := e2e.NewDirectBox(alicePub, bobPriv)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(benchPayload)
	for b.Loop() {
		if _, err := box.Open(nonce, ct); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPublicKeyToCurve25519(b *testing.B) {
	pub, _ := testKey("alice")
	for b.Loop() {
		if _, err := e2e.PublicKeyToCurve25519(pub); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSealGroup(b *testing.B) {
	key := e2e.GenerateMeshKey()
	msg := pattern(benchPayload)
	b.SetBytes(benchPayload)
	for b.Loop() {
		if _, _, err := e2e.SealGroup(msg, key); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpenGroup(b *testing.B) {
	key := e2e.GenerateMeshKey()
	nonce, ct, err := e2e.SealGroup(pattern(benchPayload), key)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(benchPayload)
	for b.Loop() {
		if _, err := e2e.OpenGroup(nonce, ct, key); err != nil {
			b.Fatal(err)
		}
	}
}
