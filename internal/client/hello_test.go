package client_test

import (
	"crypto/ed25519"
	"testing"

	"github.com/claudemesh/broker/internal/client"
)

// Hellos of one identity in quick succession never repeat a signature (it
// covers only the ids and the millisecond): the broker would refuse the
// second as a replay.
func TestHellosNeverRepeatASignature(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(nil)
	id := client.Identity{MeshID: "m", MemberID: "u", Priv: priv}
	seen := map[string]bool{}
	for i := 0; i < 200; i++ {
		h := client.NewHello(id, client.HelloOptions{})
		if seen[h.Signature] {
			t.Fatalf("hello %d repeats a signature (timestamp %s)", i, h.Timestamp)
		}
		seen[h.Signature] = true
	}
}
