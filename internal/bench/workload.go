package bench

import (
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/protocol"
)

// workload is every send of a timed phase, prepared before it starts:
// targets drawn, envelopes sealed, frames marshalled. During the phase the
// generator only writes bytes and looks things up, so it measures the
// broker rather than its own crypto and JSON.
type workload struct {
	peers     int
	broadcast bool // every message goes to "*" (all peers but the sender)
	scheduled bool // open loop: intended holds each message's send time

	sender     []int32
	target     []int32  // direct: the recipient peer
	intended   []int64  // scheduled: ns after the start of the phase
	frames     [][]byte // the send frames
	ciphertext []string
	byNonce    map[string]int32
	bySender   [][]int32 // each peer's messages in send order
}

func (w *workload) messages() int { return len(w.sender) }

// fanout is how many deliveries one message should produce.
func (w *workload) fanout() int {
	if w.broadcast {
		return w.peers - 1
	}
	return 1
}

// slot is the ledger slot of message i delivered to recipient, and whether
// that peer is a recipient of the message at all.
func (w *workload) slot(i int32, recipient int) (int, bool) {
	if recipient < 0 || recipient >= w.peers {
		return 0, false
	}
	if w.broadcast {
		if int(w.sender[i]) == recipient {
			return 0, false
		}
		return int(i)*w.peers + recipient, true
	}
	return int(i), int(w.target[i]) == recipient
}

// crossNodePct is the share of direct messages whose sender and recipient
// sit on different nodes when peer p is on node p mod nodes.
func (w *workload) crossNodePct(nodes int) float64 {
	if w.broadcast || nodes < 2 || w.messages() == 0 {
		return 0
	}
	cross := 0
	for i := range w.sender {
		if int(w.sender[i])%nodes != int(w.target[i])%nodes {
			cross++
		}
	}
	return float64(cross) / float64(w.messages()) * 100
}

// plan says what to prepare.
type plan struct {
	keys      []ed25519.PrivateKey
	meshKey   *[e2e.MeshKeySize]byte // for broadcasts
	broadcast bool
	perPeer   int           // burst/broadcast: messages per peer
	rate      float64       // scheduled: messages per second over all peers
	duration  time.Duration // scheduled: length of the sending phase
	size      int           // plaintext bytes
	seed      uint64
}

// maxSlots bounds the ledger (12 bytes per slot).
const maxSlots = 50_000_000

// prepare seals every envelope of the plan. Direct messages go to a
// uniformly random other peer, sealed with crypto_box under the pair's
// precomputed key (one DirectBox per unordered pair: the key is
// symmetric); broadcasts are sealed with crypto_secretbox under the mesh
// key, as real clients do.
func prepare(p plan) (*workload, error) {
	n := len(p.keys)
	if n < 2 {
		return nil, fmt.Errorf("need at least 2 peers, got %d", n)
	}
	w := &workload{peers: n, broadcast: p.broadcast, scheduled: p.rate > 0}
	total := n * p.perPeer
	if w.scheduled {
		total = int(p.rate * p.duration.Seconds())
	}
	slots := total
	if w.broadcast {
		slots = total * n
	}
	if total <= 0 || slots > maxSlots || total > 1<<31-1 {
		return nil, fmt.Errorf("%d messages (%d deliveries) is outside 1..%d deliveries", total, slots, maxSlots)
	}
	if w.broadcast && p.meshKey == nil {
		return nil, errors.New("broadcast needs the mesh key")
	}
	rng := rand.New(rand.NewPCG(p.seed, p.seed^0x9e3779b97f4a7c15))
	pubs := make([]ed25519.PublicKey, n)
	pubHex := make([]string, n)
	for i, k := range p.keys {
		pubs[i] = k.Public().(ed25519.PublicKey)
		pubHex[i] = hex.EncodeToString(pubs[i])
	}
	boxes := map[[2]int32]*e2e.DirectBox{}
	box := func(a, b int32) (*e2e.DirectBox, error) {
		key := [2]int32{min(a, b), max(a, b)}
		if bx := boxes[key]; bx != nil {
			return bx, nil
		}
		bx, err := e2e.NewDirectBox(pubs[b], p.keys[a])
		if err != nil {
			return nil, err
		}
		boxes[key] = bx
		return bx, nil
	}

	w.sender = make([]int32, total)
	w.target = make([]int32, total)
	w.frames = make([][]byte, total)
	w.ciphertext = make([]string, total)
	w.byNonce = make(map[string]int32, total)
	w.bySender = make([][]int32, n)
	if w.scheduled {
		w.intended = make([]int64, total)
	}
	plaintext := make([]byte, max(p.size, 1))
	for i := range total {
		var s int32
		switch {
		case w.scheduled: // round-robin: each peer sends rate/n messages per second
			s = int32(i % n)
			w.intended[i] = int64(float64(i) / p.rate * float64(time.Second))
		default: // peer by peer, each sending perPeer
			s = int32(i / p.perPeer)
		}
		w.sender[i] = s
		w.bySender[s] = append(w.bySender[s], int32(i))
		fillPlaintext(plaintext, s, i)
		send := protocol.Send{Type: protocol.TypeSend, ID: strconv.Itoa(i), Priority: protocol.PriorityNext}
		if w.broadcast {
			w.target[i] = -1
			send.TargetSpec = "*"
			var err error
			if send.Nonce, send.Ciphertext, err = e2e.SealGroup(plaintext, p.meshKey); err != nil {
				return nil, err
			}
		} else {
			t := int32(rng.IntN(n - 1))
			if t >= s {
				t++
			}
			w.target[i] = t
			send.TargetSpec = pubHex[t]
			bx, err := box(s, t)
			if err != nil {
				return nil, err
			}
			send.Nonce, send.Ciphertext = bx.Seal(plaintext)
		}
		frame, err := json.Marshal(send)
		if err != nil {
			return nil, err
		}
		if _, dup := w.byNonce[send.Nonce]; dup {
			return nil, fmt.Errorf("nonce collision at message %d", i) // 2^-192: a broken RNG
		}
		w.frames[i] = frame
		w.ciphertext[i] = send.Ciphertext
		w.byNonce[send.Nonce] = int32(i)
	}
	return w, nil
}

// fillPlaintext writes a readable header naming the message, padded to
// the buffer's length.
func fillPlaintext(buf []byte, sender int32, i int) {
	header := fmt.Sprintf("meshbench from=%d msg=%d ", sender, i)
	n := copy(buf, header)
	for j := n; j < len(buf); j++ {
		buf[j] = '.'
	}
}
