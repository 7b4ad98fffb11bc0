package client

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"sync"

	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/protocol"
)

// ErrNoMeshKey is returned when a broadcast or group message must be sealed
// or opened but the mesh key is unknown (a member enrolled without an invite
// never received it).
var ErrNoMeshKey = errors.New("no mesh key: broadcast and group messages cannot be encrypted (join the mesh with an invite to receive its key)")

// Message kinds, derived from the push's targetSpec.
const (
	KindDirect    = "direct"
	KindBroadcast = "broadcast"
	KindGroup     = "group"
)

// sealer encrypts outgoing and decrypts incoming envelopes. Direct
// messages use crypto_box between the two members' keys; broadcast ("*") and
// group ("@name") messages use crypto_secretbox under the mesh root key.
type sealer struct {
	priv    ed25519.PrivateKey
	meshKey *[e2e.MeshKeySize]byte

	mu    sync.Mutex
	boxes map[string]*e2e.DirectBox // by peer pubkey hex
}

// maxBoxes bounds the DirectBox cache; past it the cache starts over.
const maxBoxes = 1024

func newSealer(priv ed25519.PrivateKey, meshKey *[e2e.MeshKeySize]byte) *sealer {
	return &sealer{priv: priv, meshKey: meshKey, boxes: map[string]*e2e.DirectBox{}}
}

func (s *sealer) box(pubHex string) (*e2e.DirectBox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.boxes[pubHex]; b != nil {
		return b, nil
	}
	pub, err := e2e.ParsePublicKeyHex(pubHex)
	if err != nil {
		return nil, err
	}
	b, err := e2e.NewDirectBox(pub, s.priv)
	if err != nil {
		return nil, err
	}
	if len(s.boxes) >= maxBoxes {
		clear(s.boxes)
	}
	s.boxes[pubHex] = b
	return b, nil
}

// seal encrypts plaintext for targetSpec (a pubkey, "*" or "@group").
func (s *sealer) seal(targetSpec string, plaintext []byte) (nonce, ciphertext string, err error) {
	kind, arg := protocol.ParseTarget(targetSpec)
	switch kind {
	case protocol.TargetPubkey:
		b, err := s.box(arg)
		if err != nil {
			return "", "", fmt.Errorf("recipient key: %w", err)
		}
		nonce, ciphertext = b.Seal(plaintext)
		return nonce, ciphertext, nil
	case protocol.TargetBroadcast, protocol.TargetGroup:
		if s.meshKey == nil {
			return "", "", ErrNoMeshKey
		}
		return e2e.SealGroup(plaintext, s.meshKey)
	}
	return "", "", fmt.Errorf("target %q must be a 64-hex pubkey, * or @group", targetSpec)
}

// kindOf classifies a push by its targetSpec: a pubkey (or no target, as
// from a v0.1 sender) means a direct message.
func kindOf(targetSpec string) string {
	switch kind, _ := protocol.ParseTarget(targetSpec); kind {
	case protocol.TargetBroadcast:
		return KindBroadcast
	case protocol.TargetGroup:
		return KindGroup
	}
	return KindDirect
}

// open decrypts a pushed envelope.
func (s *sealer) open(p *protocol.Push) ([]byte, error) {
	if kindOf(p.TargetSpec) != KindDirect {
		if s.meshKey == nil {
			return nil, ErrNoMeshKey
		}
		return e2e.OpenGroup(p.Nonce, p.Ciphertext, s.meshKey)
	}
	b, err := s.box(p.SenderPubkey)
	if err != nil {
		return nil, fmt.Errorf("sender key: %w", err)
	}
	return b.Open(p.Nonce, p.Ciphertext)
}
