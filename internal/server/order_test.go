package server_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// A sender and a recipient on one node: each send's ack is on the wire
// before its push, as the original broker wrote them (its load script
// counts a push only after the matching ack). The order is observed where
// it is made, at the sockets' writes: every ack's write has returned
// before its push's write begins.
func TestAckBeforePushOnTheWire(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	rounds := &n.Engine().TestSignals.ClaimRound
	rounds.Init()
	caughtUp := func() {
		t.Helper()
		if _, ok := rounds.WaitFor(10*time.Second, func(c delivery.ClaimRound) bool { return c.Members > 0 }); !ok {
			t.Fatal("no claim round for a hello")
		}
	}
	a := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	caughtUp()
	b := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	caughtUp() // from here every send to b takes the fast path
	frames := &n.Server().TestSignals.Frame
	frames.Init()

	const count = 200
	pushed := make(chan map[string]bool, 1)
	go func() {
		got := map[string]bool{}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for len(got) < count {
			f, err := b.Next(ctx)
			if err != nil {
				break
			}
			var p protocol.Push
			if f.Type == protocol.TypePush && f.Decode(&p) == nil && p.Subtype == "" {
				got[p.MessageID] = true
			}
		}
		pushed <- got
	}()
	for i := range count {
		testkit.Write(t, a, protocol.Send{Type: protocol.TypeSend, ID: fmt.Sprint(i), TargetSpec: mesh.Members[1].Pubkey(),
			Priority: protocol.PriorityNow, Nonce: "bm9uY2U=", Ciphertext: "eA=="})
	}
	acked := map[string]bool{}
	for len(acked) < count {
		var ack protocol.Ack
		if err := testkit.Expect(t, a, protocol.TypeAck, 30*time.Second).Decode(&ack); err != nil || !ack.Queued {
			t.Fatalf("ack %+v %v", ack, err)
		}
		acked[ack.MessageID] = true
	}
	if got := <-pushed; len(got) != count {
		t.Fatalf("%d of %d pushed", len(got), count)
	}
	ackAt, pushAt := map[int64]int64{}, map[int64]int64{}
	for len(ackAt) < count || len(pushAt) < count {
		ev, ok := frames.Wait(10 * time.Second)
		if !ok {
			t.Fatalf("frame events: %d acks, %d pushes of %d", len(ackAt), len(pushAt), count)
		}
		switch ev.Kind {
		case "ack":
			ackAt[ev.MessageID] = ev.Seq
		case "push":
			pushAt[ev.MessageID] = ev.Seq
		}
	}
	for id := range acked {
		mid, _ := strconv.ParseInt(id, 10, 64)
		if ackAt[mid] == 0 || pushAt[mid] == 0 || ackAt[mid] > pushAt[mid] {
			t.Fatalf("message %s: ack written at %d, push written from %d", id, ackAt[mid], pushAt[mid])
		}
	}
}
