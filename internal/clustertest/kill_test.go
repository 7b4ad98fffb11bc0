package clustertest_test

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// A node is killed with SIGKILL in the middle of a burst. Its peers
// reconnect to the other nodes; every acked message is delivered, and no
// member's application sees a message twice.
var nodeKilled = faultScenario{
	name: "node_killed", label: "SIGKILL of 1 of 3 nodes", procs: 3, env: []string{"LEASE_DURATION=5s"},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		nodes := c.procs
		killedAt := c.b.Mark("SIGKILL " + nodes[0].name)
		signalNode(t, nodes[0], syscall.SIGKILL)
		<-nodes[0].exited
		testkit.Eventually(t, 30*time.Second, "survivors see 2 nodes", func() bool {
			h1, e1 := getHealth(nodes[1].HTTPURL())
			h2, e2 := getHealth(nodes[2].HTTPURL())
			return e1 == nil && e2 == nil && h1.ClusterSize == 2 && h2.ClusterSize == 2
		})
		noticed := time.Since(killedAt)
		return faultOutcome{from: killedAt, result: recoveryIn(" (kill → survivors notice %s)", roundMs(noticed)),
			check: func(faultkit.Report) { everyThirdReconnected(t, c.b, "killed") }}
	},
}

// everyThirdReconnected checks that the peers that were on the first node
// (every third) moved.
func everyThirdReconnected(t *testing.T, b *burst, how string) {
	t.Helper()
	for i, p := range b.Peers() {
		if i%3 == 0 && p.Connects() < 2 {
			t.Errorf("peer %d was on the %s node and never reconnected", i, how)
		}
	}
}

// A node is stopped with SIGTERM in the middle of a burst: it drains
// (sessions closed with 1001 after their queued frames) and exits 0; its
// peers reconnect elsewhere and nothing acked is lost or duplicated.
var nodeTerminated = faultScenario{
	name: "node_terminated", label: "SIGTERM of 1 of 3 nodes", procs: 3, env: []string{"LEASE_DURATION=5s"},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		nodes := c.procs
		stopAt := c.b.Mark("SIGTERM " + nodes[0].name)
		signalNode(t, nodes[0], syscall.SIGTERM)
		select {
		case <-nodes[0].exited:
			if code := exitCode(nodes[0].err); code != 0 {
				t.Fatalf("SIGTERM exit code %d", code)
			}
		case <-time.After(12 * time.Second):
			t.Fatal("node did not exit within 12 s of SIGTERM")
		}
		exited := time.Since(stopAt)
		return faultOutcome{from: stopAt, result: recoveryIn(" (SIGTERM → exit 0 in %s)", roundMs(exited)),
			check: func(faultkit.Report) { everyThirdReconnected(t, c.b, "stopped") }}
	},
}

// A node stopped with SIGTERM drains: its sessions close with 1001 and
// reattach elsewhere within the grace period, so the other peers see no
// peer_left (nor a new peer_joined) for them. A control peer that cannot
// reconnect does produce a peer_left once the grace period ends, which
// shows the watchers would have seen one.
func TestGracefulShutdownNoPeerLeft(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := startProcNodes(t, db, 3, "PRESENCE_GRACE_SECONDS=3")
	mesh := procMesh(t, db, 5)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	all := []string{nodes[0].URL(), nodes[1].URL(), nodes[2].URL()}
	// Two movers and the control on node 1; watchers on nodes 2 and 3.
	var movers, watchers []*faultkit.Peer
	for i := 0; i < 2; i++ {
		movers = append(movers, faultkit.NewPeer(mesh.Members[i], all, 0))
	}
	control := faultkit.NewPeer(mesh.Members[2], []string{nodes[0].URL()}, 0)
	for i := 3; i < 5; i++ {
		watchers = append(watchers, faultkit.NewPeer(mesh.Members[i], []string{nodes[i-2].URL()}, 0, protocol.CapSystemEvents))
	}
	runPeers(t, ctx, watchers...)
	if err := faultkit.WaitConnected(ctx, 10*time.Second, watchers...); err != nil {
		t.Fatal(err)
	}
	runPeers(t, ctx, append(append([]*faultkit.Peer{}, movers...), control)...)
	// Each watcher sees the three node-1 peers join (not counting the
	// other watcher's join): the replicas agree.
	onNode1 := append(append([]*faultkit.Peer{}, movers...), control)
	testkit.Eventually(t, 10*time.Second, "joins seen by every watcher", func() bool {
		for _, w := range watchers {
			events := w.Events()
			for _, p := range onNode1 {
				if !slices.ContainsFunc(events, func(e protocol.Push) bool {
					return e.Event == protocol.EventPeerJoined && strings.Contains(string(e.EventData), p.ID().MemberID)
				}) {
					return false
				}
			}
		}
		return true
	})
	for _, w := range watchers {
		w.ClearEvents()
	}
	stopAt := time.Now()
	signalNode(t, nodes[0], syscall.SIGTERM)
	select {
	case <-nodes[0].exited:
		if code := exitCode(nodes[0].err); code != 0 {
			t.Fatalf("SIGTERM exit code %d", code)
		}
	case <-time.After(12 * time.Second):
		t.Fatal("node did not exit within 10 s of SIGTERM")
	}
	exitAfter := time.Since(stopAt)
	testkit.Eventually(t, 10*time.Second, "movers reattached", func() bool {
		for _, p := range movers {
			if !p.Connected() || p.Connects() < 2 {
				return false
			}
		}
		return true
	})
	// The control's grace ends 3 s after the drain: every watcher sees its
	// peer_left, and by then the movers' grace would have ended too.
	controlLeft := func(w *faultkit.Peer) bool {
		for _, e := range w.Events() {
			if e.Event == protocol.EventPeerLeft && strings.Contains(string(e.EventData), control.ID().MemberID) {
				return true
			}
		}
		return false
	}
	testkit.Eventually(t, 20*time.Second, "control peer_left on every watcher", func() bool {
		return controlLeft(watchers[0]) && controlLeft(watchers[1])
	})
	for _, w := range watchers {
		for _, e := range w.Events() {
			if strings.Contains(string(e.EventData), control.ID().MemberID) {
				continue
			}
			if e.Event == protocol.EventPeerLeft || e.Event == protocol.EventPeerJoined {
				t.Errorf("watcher saw %s during a graceful move: %s", e.Event, e.EventData)
			}
		}
	}
	t.Logf("SIGTERM → exit in %s; movers reattached with no leave/join events; control left after grace", exitAfter.Round(time.Millisecond))
}
