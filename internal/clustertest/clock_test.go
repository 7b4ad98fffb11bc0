package clustertest_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// skewedClock is a wall clock off by d.
func skewedClock(d time.Duration) func() time.Time {
	return func() time.Time { return time.Now().Add(d) }
}

// helloCode sends a hello signed at ts and returns the rejection reason,
// or "" when it is accepted.
func helloCode(t *testing.T, url string, id client.Identity, ts time.Time) string {
	t.Helper()
	c := testkit.Dial(t, url)
	defer c.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Hello(ctx, id, client.HelloOptions{Timestamp: ts, SessionID: "skew-" + ts.Format("150405.000000")})
	var he *client.HelloError
	if errors.As(err, &he) {
		return he.Code
	}
	if err != nil {
		t.Fatal(err)
	}
	return ""
}

// Two nodes whose clocks are 2 minutes off, one ahead and one behind, in a
// cluster with a correct one, under a burst. From the moment they serve
// they judge hello timestamps by Postgres' clock: a fresh hello is
// accepted, a 90-s-old (or 90-s-early) one is refused with timestamp_skew.
// Leases are Postgres time too: a message leased to a session on a skewed
// node that never acks is redelivered elsewhere when LEASE_DURATION has
// passed, not 2 minutes early or late.
var clockSkew = faultScenario{
	name: "clock_skew", label: "clock skew ±2 min on 2 of 3 nodes", members: 3, settle: 60 * time.Second,
	start: func(t *testing.T, c *faultCluster) {
		right := testkit.StartNode(t, c.db, testkit.Options{Configure: skewLease})
		// The probe member must exist before the nodes start serving.
		probeMesh := testkit.NewMesh(t, right.Store(), 1)
		c.nodes = []*testkit.Node{right}
		for _, d := range skews {
			n := testkit.StartNode(t, c.db, testkit.Options{Configure: skewLease, Clock: skewedClock(d), Join: []*testkit.Node{right}})
			// Straight after start-up, before any periodic measurement: the
			// node already corrects its clock.
			if off := n.Counter("broker_clock_offset_seconds"); math.Abs(off+d.Seconds()) > 5 {
				t.Fatalf("node with clock %+v serves with offset %.1fs", d, off)
			}
			if code := helloCode(t, n.URL(), probeMesh.Members[0], time.Now().Add(-90*time.Second)); code != protocol.ReasonTimestampSkew {
				t.Fatalf("node with clock %+v, just started, answered a 90-s-old hello with %q", d, code)
			}
			c.nodes = append(c.nodes, n)
		}
		testkit.Eventually(t, 10*time.Second, "3-node cluster", membersAre(c.nodes, 3, 3, 3))
	},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		right, skewed, mesh := c.nodes[0], c.nodes[1:], c.mesh
		probe := mesh.Members[burstLoad.Peers]
		for i, n := range skewed {
			for _, tc := range []struct {
				offset time.Duration
				want   string
			}{{0, ""}, {-90 * time.Second, protocol.ReasonTimestampSkew}, {90 * time.Second, protocol.ReasonTimestampSkew}} {
				if code := helloCode(t, n.URL(), probe, time.Now().Add(tc.offset)); code != tc.want {
					t.Errorf("node with clock %+v: hello signed %+v from now: %q, want %q", skews[i], tc.offset, code, tc.want)
				}
			}
		}

		// Leases. The sender is on the correct node; the receiver's first
		// session is on a skewed node and never acks; its second is on the
		// correct node.
		sender := testkit.Connect(t, right.URL(), mesh.Members[burstLoad.Peers+1], client.HelloOptions{})
		rcv := mesh.Members[burstLoad.Peers+2]
		var redelivery []time.Duration
		for i, n := range skewed {
			first := testkit.Connect(t, n.URL(), rcv, client.HelloOptions{SessionID: fmt.Sprintf("lease-a%d", i),
				Capabilities: []string{protocol.CapClientAck}})
			ack := sendAck(t, sender, protocol.Send{TargetSpec: rcv.Pubkey(), Priority: protocol.PriorityNext, Ciphertext: "bGVhc2U="})
			if p := testkit.ExpectPush(t, first, 5*time.Second); p.MessageID != ack.MessageID {
				t.Fatalf("first session got %s, want %s", p.MessageID, ack.MessageID)
			}
			leased := time.Now()
			// dnd takes only "now": the lapsed lease cannot come back here.
			testkit.Write(t, first, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusDND})
			second := testkit.Connect(t, right.URL(), rcv, client.HelloOptions{SessionID: fmt.Sprintf("lease-b%d", i),
				Capabilities: []string{protocol.CapClientAck}})
			p := testkit.ExpectPush(t, second, skewLeaseDuration+10*time.Second)
			after := time.Since(leased)
			if p.MessageID != ack.MessageID {
				t.Fatalf("second session got %s, want %s", p.MessageID, ack.MessageID)
			}
			if after < skewLeaseDuration-500*time.Millisecond || after > skewLeaseDuration+3*time.Second {
				t.Errorf("node with clock %+v: message redelivered %s after its lease began, want about %s", skews[i], after, skewLeaseDuration)
			}
			redelivery = append(redelivery, after)
			testkit.Write(t, second, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
			first.Close()
			second.Close()
		}
		return faultOutcome{result: func(time.Duration) string {
			return fmt.Sprintf("fresh hellos accepted, ±90 s hellos refused timestamp_skew from start-up; lease of %s redelivered after %s (+2 min node) and %s (-2 min node)",
				skewLeaseDuration, roundMs(redelivery[0]), roundMs(redelivery[1]))
		}}
	},
}

const skewLeaseDuration = 4 * time.Second

var skews = []time.Duration{2 * time.Minute, -2 * time.Minute}

func skewLease(c *config.Config) { c.LeaseDuration = skewLeaseDuration }
