package clustertest_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// A node is killed with SIGKILL in the middle of a burst. Its peers
// reconnect to the other nodes; every acked message is delivered, and no
// member's application sees a message twice.
func TestNodeKilledMidBurst(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := startProcNodes(t, db, 3, "LEASE_DURATION=10s")
	st, err := store.Open(context.Background(), db, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	mesh := testkit.NewMesh(t, st, 9)
	urls := []string{nodes[0].URL(), nodes[1].URL(), nodes[2].URL()}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	peers := make([]*peer, len(mesh.Members))
	for i, id := range mesh.Members {
		peers[i] = newPeer(id, urls, i%3) // three peers on each node
		go peers[i].run(ctx)
	}
	waitFor(t, 10*time.Second, "peers connected", func() bool {
		for _, p := range peers {
			p.mu.Lock()
			c := p.conn
			p.mu.Unlock()
			if c == nil {
				return false
			}
		}
		return true
	})

	const perPeer = 120
	rng := rand.New(rand.NewPCG(1, 2))
	target := map[string]int{} // client_message_id → recipient index
	var killedAt time.Time
	for round := 0; round < perPeer; round++ {
		for i, p := range peers {
			to := rng.IntN(len(peers) - 1)
			if to >= i {
				to++
			}
			body := fmt.Sprint(round)
			target[fmt.Sprintf("%s-%s", p.id.MemberID, body)] = to
			p.send(ctx, mesh.Members[to].Pubkey(), body)
		}
		time.Sleep(2 * time.Millisecond) // a steady burst: ~4,500 msg/s offered
		if round == perPeer/3 {
			signalNode(t, nodes[0], syscall.SIGKILL)
			killedAt = time.Now()
		}
	}
	<-nodes[0].exited
	// Kill → the other nodes notice.
	waitFor(t, 30*time.Second, "survivors see 2 nodes", func() bool {
		h1, e1 := getHealth(nodes[1].HTTPURL())
		h2, e2 := getHealth(nodes[2].HTTPURL())
		return e1 == nil && e2 == nil && h1.ClusterSize == 2 && h2.ClusterSize == 2
	})
	noticed := time.Since(killedAt)
	// Kill → the killed node's peers are attached elsewhere.
	waitFor(t, 20*time.Second, "peers reattached", func() bool {
		for i, p := range peers {
			p.mu.Lock()
			ok := p.conn != nil && (i%3 != 0 || p.reconnects >= 2) // i%3 == 0 were on the killed node
			p.mu.Unlock()
			if !ok {
				return false
			}
		}
		return true
	})
	var reattached time.Duration
	for _, p := range peers {
		p.mu.Lock()
		if p.reconnects > 1 && p.connectedAt.Sub(killedAt) > reattached {
			reattached = p.connectedAt.Sub(killedAt)
		}
		p.mu.Unlock()
	}
	waitFor(t, 60*time.Second, "every send acked", func() bool {
		for _, p := range peers {
			if p.pendingCount() > 0 {
				return false
			}
		}
		return true
	})
	// Every acked message reaches its recipient.
	expected := map[int]map[string]bool{}
	for _, p := range peers {
		p.mu.Lock()
		for cmid, mid := range p.acked {
			to := target[cmid]
			if expected[to] == nil {
				expected[to] = map[string]bool{}
			}
			expected[to][mid] = true
		}
		p.mu.Unlock()
	}
	waitFor(t, 60*time.Second, "every acked message delivered", func() bool {
		for i, p := range peers {
			p.mu.Lock()
			missing := 0
			for mid := range expected[i] {
				if p.app[mid] == 0 {
					missing++
				}
			}
			p.mu.Unlock()
			if missing > 0 {
				return false
			}
		}
		return true
	})
	total, redelivered := 0, 0
	for i, p := range peers {
		p.mu.Lock()
		for mid, n := range p.app {
			if n != 1 {
				t.Errorf("peer %d's application saw %s %d times", i, mid, n)
			}
			if !expected[i][mid] {
				t.Errorf("peer %d got %s, which no sender had acked", i, mid)
			}
		}
		for _, n := range p.seen {
			redelivered += n - 1
		}
		total += len(p.app)
		p.mu.Unlock()
	}
	if total != len(peers)*perPeer {
		t.Fatalf("delivered %d distinct messages, want %d", total, len(peers)*perPeer)
	}
	t.Logf("SIGKILL of 1 of 3 nodes under a %d-message burst: lost 0, application duplicates 0, broker redeliveries %d (deduped); "+
		"kill → survivors notice %s; kill → last peer reattached %s", total, redelivered, noticed.Round(time.Millisecond), reattached.Round(time.Millisecond))
}

// A node stopped with SIGTERM drains: its sessions close with 1001 and
// reattach elsewhere within the grace period, so the other peers see no
// peer_left (nor a new peer_joined) for them. A control peer that cannot
// reconnect does produce a peer_left once the grace period ends, which
// shows the watchers would have seen one.
func TestGracefulShutdownNoPeerLeft(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := startProcNodes(t, db, 3, "PRESENCE_GRACE_SECONDS=3")
	st, err := store.Open(context.Background(), db, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	mesh := testkit.NewMesh(t, st, 5)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	all := []string{nodes[0].URL(), nodes[1].URL(), nodes[2].URL()}
	// Two movers and the control on node 1; watchers on nodes 2 and 3.
	var movers, watchers []*peer
	for i := 0; i < 2; i++ {
		movers = append(movers, newPeer(mesh.Members[i], all, 0))
	}
	control := newPeer(mesh.Members[2], []string{nodes[0].URL()}, 0)
	for i := 3; i < 5; i++ {
		watchers = append(watchers, newPeer(mesh.Members[i], []string{nodes[i-2].URL()}, 0, protocol.CapSystemEvents))
	}
	connected := func(ps ...*peer) func() bool {
		return func() bool {
			for _, p := range ps {
				p.mu.Lock()
				c := p.conn
				p.mu.Unlock()
				if c == nil {
					return false
				}
			}
			return true
		}
	}
	for _, w := range watchers {
		go w.run(ctx)
	}
	waitFor(t, 10*time.Second, "watchers connected", connected(watchers...))
	for _, p := range append(append([]*peer{}, movers...), control) {
		go p.run(ctx)
	}
	// Each watcher sees the three node-1 peers join: the replicas agree.
	waitFor(t, 10*time.Second, "joins seen by every watcher", func() bool {
		for _, w := range watchers {
			w.mu.Lock()
			n := 0
			for _, e := range w.events {
				if e.Event == protocol.EventPeerJoined {
					n++
				}
			}
			w.mu.Unlock()
			if n < 3 {
				return false
			}
		}
		return true
	})
	for _, w := range watchers {
		w.mu.Lock()
		w.events = nil
		w.mu.Unlock()
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
	waitFor(t, 10*time.Second, "movers reattached", func() bool {
		for _, p := range movers {
			p.mu.Lock()
			ok := p.conn != nil && p.reconnects >= 2
			p.mu.Unlock()
			if !ok {
				return false
			}
		}
		return true
	})
	// The control's grace ends 3 s after the drain: every watcher sees its
	// peer_left, and by then the movers' grace would have ended too.
	controlLeft := func(w *peer) bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, e := range w.events {
			if e.Event == protocol.EventPeerLeft && strings.Contains(string(e.EventData), control.id.MemberID) {
				return true
			}
		}
		return false
	}
	waitFor(t, 20*time.Second, "control peer_left on every watcher", func() bool {
		return controlLeft(watchers[0]) && controlLeft(watchers[1])
	})
	for _, w := range watchers {
		w.mu.Lock()
		for _, e := range w.events {
			if strings.Contains(string(e.EventData), control.id.MemberID) {
				continue
			}
			if e.Event == protocol.EventPeerLeft || e.Event == protocol.EventPeerJoined {
				t.Errorf("watcher saw %s during a graceful move: %s", e.Event, e.EventData)
			}
		}
		w.mu.Unlock()
	}
	t.Logf("SIGTERM → exit in %s; movers reattached with no leave/join events; control left after grace", exitAfter.Round(time.Millisecond))
}
