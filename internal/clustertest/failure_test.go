package clustertest_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// The relay listener's backend is terminated in the middle of a burst:
// nothing is lost; what the lost notifications would have announced arrives
// through the backlog re-scan or the sweep, and is counted.
func TestListenerTerminatedMidBurst(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 2)
	sender := testkit.Connect(t, nodes[0].URL(), mesh.Members[0], client.HelloOptions{})
	rcv := testkit.Connect(t, nodes[1].URL(), mesh.Members[1], client.HelloOptions{Capabilities: []string{protocol.CapClientAck}})
	const total = 400
	got := map[string]int{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		for len(got) < total {
			f, err := rcv.Next(ctx)
			if err != nil {
				return
			}
			var p protocol.Push
			if f.Type != protocol.TypePush || f.Decode(&p) != nil || p.Subtype != "" {
				continue
			}
			got[p.Ciphertext]++
			_ = rcv.WriteJSON(ctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
		}
	}()
	terminated := false
	for i := 0; i < total; i++ {
		write(t, sender, protocol.Send{Type: protocol.TypeSend, TargetSpec: mesh.Members[1].Pubkey(), Nonce: "n", Ciphertext: fmt.Sprint(i)})
		if i%20 == 19 {
			time.Sleep(5 * time.Millisecond) // pace the burst so the kill lands in the middle of it
		}
		if i == total/2 {
			var killed int
			err := nodes[0].Store().Pool().QueryRow(context.Background(),
				`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
				node.RelayApplicationName(nodes[1].Name())).Scan(&killed)
			if err != nil || killed != 1 {
				t.Fatalf("terminate listener: %v (%d backends)", err, killed)
			}
			terminated = true
		}
	}
	acks := 0
	for acks < total {
		f := testkit.Expect(t, sender, protocol.TypeAck, 10*time.Second)
		var a protocol.Ack
		if f.Decode(&a) != nil || !a.Queued {
			t.Fatalf("send failed: %s", f.Raw)
		}
		acks++
	}
	<-done
	if !terminated || len(got) != total {
		t.Fatalf("received %d of %d distinct messages", len(got), total)
	}
	for k, v := range got {
		if v != 1 {
			t.Errorf("message %s pushed %d times", k, v)
		}
	}
	recovered := nodes[1].Counter("broker_relay_recovered_total")
	t.Logf("%v of %d messages arrived through backlog/sweep rather than a notification", recovered, total)
	if recovered == 0 {
		t.Fatal("no message was recovered by a re-scan: the kill did not lose a notification")
	}
	testkit.Eventually(t, 10*time.Second, "listener reconnects", func() bool {
		return nodes[1].Counter("broker_relay_listens_total") >= 2
	})
}

// Gossip is cut between two of three nodes: messages still flow through
// Postgres, and presence heals once the partition ends.
func TestGossipPartition(t *testing.T) {
	db := pgtest.NewDB(t)
	parts := make([]*presence.Partition, 3)
	var nodes []*testkit.Node
	for i := 0; i < 3; i++ {
		i := i
		ip := fmt.Sprintf("127.0.0.%d", 21+i)
		o := testkit.Options{
			Configure: func(c *config.Config) { c.Host, c.ClusterBind = ip, ip+":0" },
			WrapTransport: func(tr memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
				parts[i] = presence.NewPartition(tr)
				return parts[i]
			},
		}
		if i > 0 {
			o.Join = nodes[:1]
		}
		nodes = append(nodes, testkit.StartNode(t, db, o))
	}
	testkit.Eventually(t, 10*time.Second, "3-node cluster", func() bool {
		return nodes[0].Cluster().NumMembers() == 3 && nodes[1].Cluster().NumMembers() == 3 && nodes[2].Cluster().NumMembers() == 3
	})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 3)
	a := testkit.Connect(t, nodes[0].URL(), mesh.Members[0], client.HelloOptions{})

	parts[0].Block("127.0.0.22")
	parts[1].Block("127.0.0.21")
	// B's new session is invisible to A for now (A hears nothing from B).
	b := testkit.Connect(t, nodes[1].URL(), mesh.Members[1], client.HelloOptions{})
	// Messages still flow A → B through Postgres, however stale A's view.
	for i := 0; i < 20; i++ {
		sendAck(t, a, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Priority: "now", Ciphertext: fmt.Sprint(i)})
	}
	for i := 0; i < 20; i++ {
		if p := testkit.ExpectPush(t, b, 10*time.Second); p.Ciphertext != fmt.Sprint(i) {
			t.Fatalf("got %q, want %d", p.Ciphertext, i)
		}
	}
	parts[0].Heal()
	parts[1].Heal()
	start := time.Now()
	testkit.Eventually(t, 15*time.Second, "presence healed", func() bool {
		return peerSet(t, a) == peerSet(t, b) && len(nodes[0].Replica().Live(mesh.MeshID)) == 2
	})
	t.Logf("presence converged %s after the partition healed", time.Since(start).Round(time.Millisecond))
}
