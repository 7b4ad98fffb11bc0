package clustertest_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/testkit"
)

// The remote fast path: a member whose only session is on another node
// gets its rows leased to that session in the insert and carried whole in
// the notification; that node pushes them without a claim. Order, client
// acks and redelivery to the member's next session (on the sending node)
// work as on the claim path, and the path can be turned off.
func TestRemoteFastPath(t *testing.T) {
	for _, off := range []bool{false, true} {
		t.Run(fmt.Sprintf("disabled=%v", off), func(t *testing.T) {
			db := pgtest.NewDB(t)
			nodes := testkit.StartCluster(t, db, 2, testkit.Options{Configure: func(c *config.Config) {
				c.DisableRemoteFastPath = off
			}})
			a, b := nodes[0], nodes[1]
			listening(t, b)
			mesh := testkit.NewMesh(t, a.Store(), 2)
			sender := testkit.Connect(t, a.URL(), mesh.Members[0], client.HelloOptions{})
			acker := client.HelloOptions{Capabilities: []string{protocol.CapClientAck}}
			rcpt := testkit.Connect(t, b.URL(), mesh.Members[1], acker)
			testkit.Eventually(t, 5*time.Second, "A sees the recipient's session live on B", func() bool {
				// Live needs B's entry and B alive in A's membership, which
				// can arrive in either order.
				_, ok := a.Replica().SoleRemoteSession(mesh.Members[1].MemberID)
				return ok
			})

			const n, acked = 40, 30
			var ids []string
			for i := range n {
				ids = append(ids, sendAck(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: strconv.Itoa(i)}).MessageID)
			}
			for i := range n {
				p := testkit.ExpectPush(t, rcpt, 10*time.Second)
				if p.MessageID != ids[i] || p.Ciphertext != strconv.Itoa(i) {
					t.Fatalf("push %d: got %s (%q), want %s: out of order or wrong row", i, p.MessageID, p.Ciphertext, ids[i])
				}
				if i < acked {
					testkit.Write(t, rcpt, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
				}
			}
			relayed := b.Counter("broker_delivery_claims_total", "reason", "relayed")
			t.Logf("%v of %d rows took the remote fast path", relayed, n)
			if off && relayed != 0 {
				t.Fatalf("%v rows relayed with the fast path off", relayed)
			}
			if !off && relayed < n/2 {
				// Some rows may take the claim path (a sweep marks the
				// member for a claim every SWEEP_INTERVAL); most must not.
				t.Fatalf("only %v of %d rows took the remote fast path", relayed, n)
			}
			testkit.Eventually(t, 5*time.Second, "the acked rows marked delivered", func() bool {
				return b.Counter("broker_messages_delivered_total") >= acked
			})

			// The recipient leaves without acking the last rows and comes
			// back on the sender's node: those rows, and only those, come
			// again, in order.
			if err := rcpt.Close(); err != nil {
				t.Fatal(err)
			}
			again := testkit.Connect(t, a.URL(), mesh.Members[1], acker)
			for i := acked; i < n; i++ {
				p := testkit.ExpectPush(t, again, 10*time.Second)
				if p.MessageID != ids[i] {
					t.Fatalf("redelivery %d: got %s, want %s", i, p.MessageID, ids[i])
				}
				testkit.Write(t, again, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
			}
			if extra := drain(t, again, 500*time.Millisecond); len(extra) != 0 {
				t.Fatalf("%d rows delivered twice, first %s", len(extra), extra[0].MessageID)
			}
		})
	}
}

// An envelope whose lease names a session that is gone, or an earlier
// incarnation of the receiving node, gives its row back at once: the
// member's live session gets it through a claim, without waiting for the
// lease to run out.
func TestRemoteFastPathStaleLease(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{Configure: func(c *config.Config) {
		// Only a release can free the rows in time: no lease runs out, and
		// no sweep claims the rows leased to this node.
		c.LeaseDuration = time.Hour
		c.SweepInterval = time.Hour
	}})
	b := nodes[1]
	listening(t, b)
	mesh := testkit.NewMesh(t, b.Store(), 2)
	rcpt := testkit.Connect(t, b.URL(), mesh.Members[1], client.HelloOptions{})
	bNode := b.Replica().Self() + "#" + strconv.FormatInt(b.Replica().Incarnation(), 10)

	for _, tc := range []struct{ name, node, presence, conn string }{
		{"session gone", bNode, "no-such-presence", "no-such-conn"},
		{"earlier incarnation", b.Replica().Self() + "#0", "p", "c"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := delivery.NewMessage{
				MeshID: mesh.MeshID, SenderMemberID: mesh.Members[0].MemberID, SenderPubkey: mesh.Members[0].Pubkey(),
				SenderName: "p0", TargetSpec: mesh.Members[1].Pubkey(), Priority: 1, Nonce: "bg==", Ciphertext: tc.name,
				Recipients: []delivery.NewRecipient{{MemberID: mesh.Members[1].MemberID, LeaseConn: tc.conn, LeaseNode: tc.node}},
			}
			prefix := relay.EnvelopePrefix(time.Now())
			pending, ok := relay.NewPending(relay.NodeChannel(b.Replica().Self()), prefix, &relay.Envelope{
				Node: tc.node, Presence: tc.presence, Conn: tc.conn, MeshID: mesh.MeshID, MemberID: mesh.Members[1].MemberID,
				Priority: 1, SenderMemberID: msg.SenderMemberID, SenderPubkey: msg.SenderPubkey, SenderName: msg.SenderName,
				TargetSpec: msg.TargetSpec, Nonce: msg.Nonce, Ciphertext: msg.Ciphertext,
			})
			if !ok {
				t.Fatal("envelope does not fit")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res, err := b.Store().InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "other#1", Lease: time.Hour, Messages: []delivery.NewMessage{msg}, Envelopes: []delivery.EnvelopeNotify{{Ord: 0, Pending: pending}}})
			if err != nil {
				t.Fatal(err)
			}
			p := testkit.ExpectPush(t, rcpt, 10*time.Second)
			if p.MessageID != strconv.FormatInt(res[0].ID, 10) || p.Ciphertext != tc.name {
				t.Fatalf("got %s %q, want %d %q", p.MessageID, p.Ciphertext, res[0].ID, tc.name)
			}
		})
	}
}

// listening waits until the node's relay listener has subscribed to every
// channel: a notification sent before would only be found by a re-scan.
func listening(t *testing.T, n *testkit.Node) {
	t.Helper()
	if _, ok := n.Engine().TestSignals.Listening.Wait(10 * time.Second); !ok {
		t.Fatal("relay listener never subscribed")
	}
}
