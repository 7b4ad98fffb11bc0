package e2e_test

import (
	"fmt"

	"github.com/claudemesh/broker/internal/e2e"
)

func Example() {
	// Each peer has an Ed25519 identity.
	alicePub, alicePriv, _ := e2e.GenerateKey()
	bobPub, bobPriv, _ := e2e.GenerateKey()

	// Alice → Bob, direct. A client that talks to Bob often keeps the
	// DirectBox instead of calling SealDirect for each message.
	toBob, err := e2e.NewDirectBox(bobPub, alicePriv)
	if err != nil {
		panic(err)
	}
	nonce, ciphertext := toBob.Seal([]byte("hi Bob"))
	msg, err := e2e.OpenDirect(nonce, ciphertext, alicePub, bobPriv)
	fmt.Printf("%s %v\n", msg, err)

	// Broadcast to every holder of the mesh key.
	meshKey := e2e.GenerateMeshKey()
	nonce, ciphertext, _ = e2e.SealGroup([]byte("hi all"), meshKey)
	msg, err = e2e.OpenGroup(nonce, ciphertext, meshKey)
	fmt.Printf("%s %v\n", msg, err)
	// Output:
	// hi Bob <nil>
	// hi all <nil>
}
