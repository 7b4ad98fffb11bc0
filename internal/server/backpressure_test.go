package server_test

import (
	"context"
	"fmt"
	"hash/fnv"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// commitShard is the committer shard a sender's sends go to (as
// server.committer.submit picks it, with its 2 shards).
func commitShard(memberID string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(memberID))
	return h.Sum32() % 2
}

// Two senders on the recipient's node, in different commit shards, each
// pipeline more messages than the recipient's send queue holds. The
// recipient reads as fast as it can: it is not a slow consumer and must
// get every message, in order per sender, without being disconnected.
func TestBurstLargerThanSendQueue(t *testing.T) {
	db := pgtest.NewDB(t)
	const queue = 64
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.SendQueueLen = queue }})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	// Two senders that commit on different shards, concurrently.
	var senders []client.Identity
	for i := 0; len(senders) < 2 && i < 64; i++ {
		id := mesh.AddMember(t, n.Store(), fmt.Sprintf("s%d", i))
		if len(senders) == 0 || commitShard(id.MemberID) != commitShard(senders[0].MemberID) {
			senders = append(senders, id)
		}
	}
	if len(senders) != 2 {
		t.Fatal("no two members in different commit shards")
	}
	rcv := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	const each = 5 * queue
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := make(chan error, len(senders))
	for si, id := range senders {
		c := testkit.Connect(t, n.URL(), id, client.HelloOptions{})
		go func() {
			for i := 0; i < each; i++ {
				s := protocol.Send{Type: protocol.TypeSend, TargetSpec: mesh.Members[0].Pubkey(), Priority: protocol.PriorityNow,
					Nonce: "bg==", Ciphertext: fmt.Sprintf("%d-%d", si, i)}
				if err := c.WriteJSON(ctx, s); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range senders {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	next := make([]int, len(senders))
	for got := 0; got < len(senders)*each; got++ {
		p := testkit.ExpectPush(t, rcv, 20*time.Second)
		var si, i int
		if _, err := fmt.Sscanf(p.Ciphertext, "%d-%d", &si, &i); err != nil || si >= len(senders) {
			t.Fatalf("unexpected push %q", p.Ciphertext)
		}
		if i != next[si] {
			t.Fatalf("sender %d: got message %d, want %d", si, i, next[si])
		}
		next[si]++
	}
	if c := n.Counter("broker_slow_consumers_total"); c != 0 {
		t.Fatalf("a reading session was closed as a slow consumer (%v)", c)
	}
}
