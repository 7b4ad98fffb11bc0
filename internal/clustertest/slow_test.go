package clustertest_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// writeTimeout is the broker's bound on writing one batch of frames (server package).
const writeTimeout = 10 * time.Second

// slowState describes what the node knows of a stuck member, for a
// failure message.
func slowState(t *testing.T, n *testkit.Node, id client.Identity) string {
	var queued, leased, delivered int
	err := n.Store().Pool().QueryRow(context.Background(), `
		SELECT count(*) FILTER (WHERE delivered_at IS NULL AND (lease_expires_at IS NULL OR lease_expires_at < now())),
		       count(*) FILTER (WHERE delivered_at IS NULL AND lease_expires_at >= now()),
		       count(*) FILTER (WHERE delivered_at IS NOT NULL)
		FROM delivery WHERE recipient_member_id = $1`, id.MemberID).Scan(&queued, &leased, &delivered)
	var closes []string
	for _, r := range []string{protocol.CloseReasonSlowConsumer, protocol.CloseReasonStale, "too_large", protocol.CloseReasonReplaced} {
		closes = append(closes, fmt.Sprintf("%s=%v", r, n.Counter("broker_session_closes_total", "reason", r)))
	}
	return fmt.Sprintf("its rows: %d queued, %d leased, %d delivered (%v); pushes written %v; claims %v; sessions %v; closes %v",
		queued, leased, delivered, err, n.Counter("broker_messages_routed_total"), n.Counter("broker_delivery_claims_total"),
		n.Counter("broker_connections_active"), closes)
}

// A session that stops reading is flooded with large messages while a
// burst runs between other peers of the same node. The broker closes it
// as a slow consumer (1008 slow_consumer) within its write timeout, keeps
// its unacked messages queued for the member's next session, and the
// other peers' send → push latency stays low meanwhile.
var slowConsumer = faultScenario{
	name: "slow_consumer", label: "slow consumer", members: 2, settle: 60 * time.Second,
	start: func(t *testing.T, c *faultCluster) {
		c.nodes = []*testkit.Node{testkit.StartNode(t, c.db, testkit.Options{Configure: func(c *config.Config) { c.SendQueueLen = 64 }})}
	},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		n, mesh, b := c.nodes[0], c.mesh, c.b
		flooder, slow := mesh.Members[burstLoad.Peers], mesh.Members[burstLoad.Peers+1]
		testkit.DialSilent(t, n.URL(), slow, client.HelloOptions{SessionID: "slow", Capabilities: []string{protocol.CapClientAck}}, 4096)
		f := testkit.Connect(t, n.URL(), flooder, client.HelloOptions{})
		// 8 MB: more than the broker's socket send buffer (at most 4 MB
		// here), the stuck peer's small receive buffer and the session
		// queue hold.
		const count, size = 250, 32 << 10
		closes := n.Counter("broker_session_closes_total", "reason", protocol.CloseReasonSlowConsumer)
		slows := n.Counter("broker_slow_consumers_total")
		floodAt := b.Mark("slow consumer flooded")
		body := strings.Repeat("A", size)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		for i := 0; i < count; i++ {
			s := protocol.Send{Type: protocol.TypeSend, ID: fmt.Sprint(i), TargetSpec: slow.Pubkey(), Priority: protocol.PriorityNow,
				Nonce: "bm9uY2U=", Ciphertext: body}
			if err := f.WriteJSON(ctx, s); err != nil {
				t.Fatal(err)
			}
		}
		acked := map[string]bool{}
		for len(acked) < count {
			var a protocol.Ack
			if err := testkit.Expect(t, f, protocol.TypeAck, 30*time.Second).Decode(&a); err != nil || !a.Queued {
				t.Fatalf("flood send: %+v %v", a, err)
			}
			acked[a.MessageID] = true
		}
		lastAck := time.Now()
		// The session is stuck once the buffers are full, before the flood
		// ends unless the broker lags behind its acks (a loaded machine).
		deadline := time.Now().Add(writeTimeout + 30*time.Second)
		for n.Counter("broker_session_closes_total", "reason", protocol.CloseReasonSlowConsumer) == closes {
			if time.Now().After(deadline) {
				t.Fatalf("the stuck session was not closed %s after the flood's last ack; %s", time.Since(lastAck).Round(time.Millisecond), slowState(t, n, slow))
			}
			time.Sleep(20 * time.Millisecond)
		}
		closedAt := time.Now()
		if got := n.Counter("broker_slow_consumers_total"); got != slows+1 {
			t.Errorf("broker_slow_consumers_total went from %v to %v, want one more", slows, got)
		}

		// Other peers were not held up.
		before := b.Latencies(time.Time{}, floodAt)
		during := b.Latencies(floodAt, closedAt)
		p99Before, p99During := faultkit.Quantile(before, 0.99), faultkit.Quantile(during, 0.99)
		if len(during) < 10 {
			t.Fatalf("only %d messages measured during the flood", len(during))
		}
		if limit := max(time.Second, 5*p99Before); p99During > limit {
			t.Errorf("p99 send → push of other peers rose from %s to %s (limit %s) while a consumer was stuck", p99Before, p99During, limit)
		}

		// Nothing the stuck session held is lost: its next session gets all.
		next := testkit.Connect(t, n.URL(), slow, client.HelloOptions{SessionID: "slow-2", Capabilities: []string{protocol.CapClientAck}})
		got := map[string]int{}
		for len(got) < count {
			p := testkit.ExpectPush(t, next, 30*time.Second)
			got[p.MessageID]++
			testkit.Write(t, next, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
			if !acked[p.MessageID] {
				t.Fatalf("next session got %s, which the flooder never sent", p.MessageID)
			}
		}
		return faultOutcome{result: func(time.Duration) string {
			return fmt.Sprintf("stuck session closed slow_consumer %s after the flood began (%s after its last ack; write timeout %s); all %d of its messages reached its next session; "+
				"other peers' p99 %s before, %s during (%d samples)",
				roundMs(closedAt.Sub(floodAt)), roundMs(closedAt.Sub(lastAck)), writeTimeout, count,
				roundMs(p99Before), roundMs(p99During), len(during))
		}}
	},
}
