package clustertest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func sendAck(t testing.TB, c *client.Conn, s protocol.Send) protocol.Ack {
	t.Helper()
	s.Type = protocol.TypeSend
	if s.Nonce == "" {
		s.Nonce = "bg=="
	}
	testkit.Write(t, c, s)
	var ack protocol.Ack
	if err := testkit.Expect(t, c, protocol.TypeAck, 10*time.Second).Decode(&ack); err != nil {
		t.Fatal(err)
	}
	if !ack.Queued {
		t.Fatalf("send rejected: %+v", ack)
	}
	return ack
}

// drain collects envelope pushes until none arrives for quiet.
func drain(t testing.TB, c *client.Conn, quiet time.Duration) []protocol.Push {
	t.Helper()
	var out []protocol.Push
	for {
		ctx, cancel := context.WithTimeout(context.Background(), quiet)
		f, err := c.Next(ctx)
		cancel()
		if err != nil {
			return out
		}
		var p protocol.Push
		if f.Type == protocol.TypePush && f.Decode(&p) == nil && p.Subtype == "" {
			out = append(out, p)
		}
	}
}

// Sender on node A, recipients on B and C: direct, broadcast and group
// messages each reach every addressed member exactly once.
func TestCrossNodeDelivery(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 3, testkit.Options{})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 4)
	sender := testkit.Connect(t, nodes[0].URL(), mesh.Members[0], client.HelloOptions{})
	b := testkit.Connect(t, nodes[1].URL(), mesh.Members[1], client.HelloOptions{Groups: []string{"ops"}})
	c := testkit.Connect(t, nodes[2].URL(), mesh.Members[2], client.HelloOptions{Groups: []string{"ops"}})
	// Member 3 is offline; it is addressed by the broadcast only.
	testkit.Eventually(t, 5*time.Second, "group replicated to A", func() bool {
		return len(nodes[0].Replica().GroupMembers(mesh.MeshID, "ops")) == 2
	})
	direct := sendAck(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "ZGlyZWN0"})
	all := sendAck(t, sender, protocol.Send{TargetSpec: "*", Ciphertext: "YWxs"})
	group := sendAck(t, sender, protocol.Send{TargetSpec: "@ops", Ciphertext: "Z3JvdXA="})

	ids := func(ps []protocol.Push) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.MessageID)
		}
		sort.Strings(out)
		return out
	}
	wantB := []string{direct.MessageID, all.MessageID, group.MessageID}
	wantC := []string{all.MessageID, group.MessageID}
	sort.Strings(wantB)
	sort.Strings(wantC)
	if got := ids(drain(t, b, time.Second)); !slices.Equal(got, wantB) {
		t.Fatalf("B got %v, want %v", got, wantB)
	}
	if got := ids(drain(t, c, time.Second)); !slices.Equal(got, wantC) {
		t.Fatalf("C got %v, want %v", got, wantC)
	}
	// The offline member connects to C later and gets the broadcast once.
	d := testkit.Connect(t, nodes[2].URL(), mesh.Members[3], client.HelloOptions{})
	if got := ids(drain(t, d, time.Second)); !slices.Equal(got, []string{all.MessageID}) {
		t.Fatalf("late member got %v", got)
	}
	if nodes[0].Counter("broker_relay_notifications_sent_total") == 0 || nodes[1].Counter("broker_relay_notifications_received_total") == 0 {
		t.Fatal("delivery did not go through the relay")
	}
}

func peerSet(t testing.TB, c *client.Conn) string {
	t.Helper()
	testkit.Write(t, c, protocol.ListPeers{Type: protocol.TypeListPeers})
	var pl protocol.PeersList
	if err := testkit.Expect(t, c, protocol.TypePeersList, 5*time.Second).Decode(&pl); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range pl.Peers {
		ids = append(ids, p.PresenceID+"@"+p.Node)
	}
	sort.Strings(ids)
	return strings.Join(ids, ",")
}

// list_peers asked on each of 3 nodes returns the same set within 2 s of a
// connect and of a close.
func TestListPeersConverges(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 3, testkit.Options{Configure: func(c *config.Config) { c.PresenceGrace = 1 }})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 4)
	var observers []*client.Conn
	for i, n := range nodes {
		observers = append(observers, testkit.Connect(t, n.URL(), mesh.Members[i], client.HelloOptions{}))
	}
	converged := func(want int) func() bool {
		return func() bool {
			first := peerSet(t, observers[0])
			if strings.Count(first, ",")+1 != want {
				return false
			}
			for _, o := range observers[1:] {
				if peerSet(t, o) != first {
					return false
				}
			}
			return true
		}
	}
	start := time.Now()
	testkit.Eventually(t, 2*time.Second, "3 peers everywhere", converged(3))
	t.Logf("initial convergence %s", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	extra := testkit.Connect(t, nodes[1].URL(), mesh.Members[3], client.HelloOptions{})
	testkit.Eventually(t, 2*time.Second, "connect visible on every node", converged(4))
	t.Logf("connect → visible on all nodes: %s", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	extra.Close()
	testkit.Eventually(t, 2*time.Second, "close visible on every node", converged(3))
	t.Logf("close → gone from all nodes: %s", time.Since(start).Round(time.Millisecond))
}

// A hook posted to node C for a session on node A is forwarded to A, which
// releases the session's held messages.
func TestHookForwardedToOwner(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 3, testkit.Options{})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 2)
	rcv := testkit.Connect(t, nodes[0].URL(), mesh.Members[1], client.HelloOptions{PID: 31337, Cwd: "/proj/x"})
	sender := testkit.Connect(t, nodes[1].URL(), mesh.Members[0], client.HelloOptions{})
	testkit.Write(t, rcv, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	testkit.Eventually(t, 3*time.Second, "working replicated to C", func() bool {
		for _, e := range nodes[2].Replica().Live(mesh.MeshID) {
			if e.MemberID == mesh.Members[1].MemberID {
				return e.Status == protocol.StatusWorking
			}
		}
		return false
	})
	held := sendAck(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Priority: "next", Ciphertext: "aGVsZA=="})
	if got := drain(t, rcv, 500*time.Millisecond); len(got) != 0 {
		t.Fatalf("working session got %d next messages", len(got))
	}
	resp, err := http.Post(nodes[2].HookURL(), "application/json",
		strings.NewReader(`{"cwd":"/proj/x","pid":31337,"status":"idle"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("hook on C: %d", resp.StatusCode)
	}
	if p := testkit.ExpectPush(t, rcv, 5*time.Second); p.MessageID != held.MessageID {
		t.Fatalf("got %+v", p)
	}
}

// Cross-node latency at a modest rate: sender on A, receiver on B.
func TestCrossNodeLatency(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	mesh := testkit.NewMesh(t, nodes[0].Store(), 2)
	sender := testkit.Connect(t, nodes[0].URL(), mesh.Members[0], client.HelloOptions{})
	rcv := testkit.Connect(t, nodes[1].URL(), mesh.Members[1], client.HelloOptions{})
	const count = 200
	var lat []time.Duration
	tick := time.NewTicker(5 * time.Millisecond) // 200 msg/s
	defer tick.Stop()
	for i := 0; i < count; i++ {
		<-tick.C
		start := time.Now()
		testkit.Write(t, sender, protocol.Send{Type: protocol.TypeSend, TargetSpec: mesh.Members[1].Pubkey(), Nonce: "n", Ciphertext: fmt.Sprint(i)})
		p := testkit.ExpectPush(t, rcv, 5*time.Second)
		if p.Ciphertext != fmt.Sprint(i) {
			t.Fatalf("got %q, want %d", p.Ciphertext, i)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	t.Logf("cross-node send→push over %d messages: p50 %s p99 %s max %s", count,
		lat[count/2].Round(10*time.Microsecond), lat[count*99/100].Round(10*time.Microsecond), lat[count-1].Round(10*time.Microsecond))
}

func jsonDecode(resp *http.Response, v any) error { return json.NewDecoder(resp.Body).Decode(v) }
