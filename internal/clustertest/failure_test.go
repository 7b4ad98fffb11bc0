package clustertest_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/testkit"
)

// shortLease makes leases of crashed or cut-off sessions run out quickly.
func shortLease(c *config.Config) { c.LeaseDuration = 5 * time.Second }

func nodeURLs(nodes []*testkit.Node) []string {
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = n.URL()
	}
	return urls
}

// The relay listener's backend is terminated in the middle of a burst:
// nothing is lost; what the lost notifications would have announced arrives
// through the backlog re-scan or the sweep, and is counted.
var listenerTerminated = faultScenario{
	name: "listener_terminated", label: "relay listener terminated", start: shortLeaseCluster(2), settle: 60 * time.Second,
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		nodes := c.nodes
		relistened := &nodes[1].Engine().TestSignals.Listening
		relistened.Clear()
		listens := nodes[1].Counter("broker_relay_listens_total")
		recovered := nodes[1].Counter("broker_relay_recovered_total")
		at := c.b.Mark("terminate the relay listener of " + nodes[1].Name())
		var killed int
		err := nodes[0].Store().Pool().QueryRow(context.Background(),
			`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
			node.RelayApplicationName(nodes[1].Name())).Scan(&killed)
		if err != nil || killed != 1 {
			t.Fatalf("terminate listener: %v (%d backends)", err, killed)
		}
		if _, ok := relistened.Wait(10 * time.Second); !ok {
			t.Fatal("the listener did not listen again")
		}
		if got := nodes[1].Counter("broker_relay_listens_total"); got <= listens {
			t.Fatalf("broker_relay_listens_total %v, was %v: the relisten was not counted", got, listens)
		}
		relisten := time.Since(at)
		var rescued float64
		return faultOutcome{from: at,
			result: func(recovery time.Duration) string {
				return fmt.Sprintf("recovery %s; listening again after %s; %v messages arrived through backlog/sweep rather than a notification",
					roundMs(recovery), roundMs(relisten), rescued)
			},
			check: func(faultkit.Report) {
				rescued = nodes[1].Counter("broker_relay_recovered_total") - recovered
				if rescued == 0 {
					t.Fatal("no message was recovered by a re-scan: the kill did not lose a notification")
				}
			},
		}
	},
}

// One node's gossip is cut from the two others during a burst, long
// enough for each side to declare the other dead, then healed. Messages
// keep flowing through Postgres throughout; a session that connects on the
// isolated node meanwhile is invisible to the others until the heal, and
// presence converges afterwards.
var gossipPartition = faultScenario{
	name: "gossip_partition", label: "gossip partition (1 node isolated) and heal", members: 1, settle: 60 * time.Second,
	start: func(t *testing.T, c *faultCluster) {
		c.parts = make([]*faultkit.Partition, 3)
		for i, ip := range partitionIPs {
			o := testkit.Options{
				Configure: func(cfg *config.Config) { cfg.Host, cfg.ClusterBind = ip, ip+":0"; shortLease(cfg) },
				WrapTransport: func(tr memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
					c.parts[i] = faultkit.NewPartition(tr)
					return c.parts[i]
				},
			}
			if i > 0 {
				o.Join = c.nodes[:1]
			}
			c.nodes = append(c.nodes, testkit.StartNode(t, c.db, o))
		}
		testkit.Eventually(t, 10*time.Second, "3-node cluster", membersAre(c.nodes, 3, 3, 3))
	},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		nodes, parts, mesh, ips := c.nodes, c.parts, c.mesh, partitionIPs
		at := c.b.Mark("isolate " + nodes[2].Name())
		parts[0].Block(ips[2])
		parts[1].Block(ips[2])
		parts[2].Block(ips[0], ips[1])
		testkit.Eventually(t, 15*time.Second, "each side declares the other dead", membersAre(nodes, 2, 2, 1))
		split := time.Since(at)
		// A session connecting on the isolated node is not gossiped across.
		late := mesh.Members[burstLoad.Peers]
		testkit.Connect(t, nodes[2].URL(), late, client.HelloOptions{SessionID: "late"})
		lateSeen := func(n *testkit.Node) bool {
			return slices.ContainsFunc(n.Replica().Live(mesh.MeshID), func(e presence.Entry) bool { return e.MemberID == late.MemberID })
		}
		recovery := c.b.WaitRecovered(t, at, 30*time.Second)
		c.b.run(burstLoad.Before)
		if lateSeen(nodes[0]) || lateSeen(nodes[1]) {
			t.Fatal("a session on the isolated node was gossiped across the partition")
		}

		healAt := c.b.Mark("heal")
		for _, p := range parts {
			p.Heal()
		}
		testkit.Eventually(t, 30*time.Second, "cluster whole and presence converged", func() bool {
			if !membersAre(nodes, 3, 3, 3)() {
				return false
			}
			want := presenceIDs(nodes[0], mesh.MeshID)
			return len(want) == burstLoad.Peers+1 && slices.Equal(presenceIDs(nodes[1], mesh.MeshID), want) &&
				slices.Equal(presenceIDs(nodes[2], mesh.MeshID), want)
		})
		healed := time.Since(healAt)
		return faultOutcome{result: func(time.Duration) string {
			return fmt.Sprintf("recovery %s (messages never stopped); split declared after %s; heal → membership and presence converged in %s",
				roundMs(recovery), roundMs(split), roundMs(healed))
		}}
	},
}

var partitionIPs = []string{"127.0.0.21", "127.0.0.22", "127.0.0.23"}

// membersAre reports whether each node sees the given number of cluster
// members.
func membersAre(nodes []*testkit.Node, want ...int) func() bool {
	return func() bool {
		for i, n := range nodes {
			if n.Cluster().NumMembers() != want[i] {
				return false
			}
		}
		return true
	}
}

// presenceIDs lists the live sessions of a mesh in a node's replica.
func presenceIDs(n *testkit.Node, mesh string) []string {
	var ids []string
	for _, e := range n.Replica().Live(mesh) {
		ids = append(ids, fmt.Sprintf("%s@%s", e.PresenceID, e.Owner))
	}
	slices.Sort(ids)
	return ids
}
