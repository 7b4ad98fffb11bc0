package server_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func listPeers(t *testing.T, c *client.Conn) []protocol.Peer {
	t.Helper()
	testkit.Write(t, c, protocol.ListPeers{Type: protocol.TypeListPeers, ReqID: "lp"})
	var pl protocol.PeersList
	if err := testkit.Expect(t, c, protocol.TypePeersList, 5*time.Second).Decode(&pl); err != nil {
		t.Fatal(err)
	}
	if pl.ReqID != "lp" {
		t.Fatalf("peers_list did not echo _reqId")
	}
	return pl.Peers
}

func expectEvent(t *testing.T, c *client.Conn, event string) protocol.PeerEvent {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		f := testkit.Expect(t, c, protocol.TypePush, time.Until(deadline))
		var p protocol.Push
		if err := f.Decode(&p); err != nil {
			t.Fatal(err)
		}
		if p.Subtype != protocol.SubtypeSystem {
			continue
		}
		if p.Event != event {
			t.Fatalf("got event %s, want %s", p.Event, event)
		}
		if p.SenderPubkey != protocol.SystemSender || p.Ciphertext != "" {
			t.Fatalf("system push shape: %s", f.Raw)
		}
		var e protocol.PeerEvent
		if err := jsonUnmarshal(p.EventData, &e); err != nil {
			t.Fatal(err)
		}
		return e
	}
}

// list_peers, set_summary, groups, system events (joined, status, left)
// and reattach within grace (no leave/join pair).
func TestPresenceAndSystemEvents(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.PresenceGrace = 2 }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	watcher := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{Capabilities: []string{protocol.CapSystemEvents}})

	peer := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{SessionID: "sess-b", PID: 77, Cwd: "/src/b", Hostname: "laptop", Groups: []string{"ops"}})
	joined := expectEvent(t, watcher, protocol.EventPeerJoined)
	if joined.MemberID != mesh.Members[1].MemberID || joined.SessionID != "sess-b" {
		t.Fatalf("joined event %+v", joined)
	}
	testkit.Write(t, peer, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: "fixing the build ✅"})
	testkit.Write(t, peer, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	st := expectEvent(t, watcher, protocol.EventPeerStatus)
	if st.Status != protocol.StatusWorking || st.StatusSource != protocol.SourceManual {
		t.Fatalf("status event %+v", st)
	}
	peers := listPeers(t, watcher)
	if len(peers) != 2 {
		t.Fatalf("list_peers returned %d peers", len(peers))
	}
	var b protocol.Peer
	for _, p := range peers {
		if p.MemberID == mesh.Members[1].MemberID {
			b = p
		}
	}
	if b.Summary != "fixing the build ✅" || b.Status != "working" || b.Cwd != "/src/b" || b.Hostname != "laptop" ||
		len(b.Groups) != 1 || b.Groups[0] != "ops" || b.Node != n.Name() || b.Pubkey != mesh.Members[1].Pubkey() || b.ConnectedAt == "" {
		t.Fatalf("peer entry %+v", b)
	}

	// Reattach within grace: same presence, status and summary; no events.
	peer.CloseNow()
	testkit.Eventually(t, 5*time.Second, "session in grace", func() bool { return len(n.Replica().Live(mesh.MeshID)) == 1 })
	again := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{SessionID: "sess-b", PID: 78, Cwd: "/src/b"})
	peers = listPeers(t, again)
	var b2 protocol.Peer
	for _, p := range peers {
		if p.MemberID == mesh.Members[1].MemberID {
			b2 = p
		}
	}
	if b2.PresenceID != b.PresenceID || b2.Status != "working" || b2.Summary != b.Summary || len(b2.Groups) != 1 {
		t.Fatalf("reattach lost the presence: %+v vs %+v", b2, b)
	}
	// Leaving for good: peer_left once the grace period (2 s) ends, and no
	// joined/left pair was emitted for the reattach.
	again.Close()
	left := expectEvent(t, watcher, protocol.EventPeerLeft)
	if left.PresenceID != b.PresenceID {
		t.Fatalf("left event %+v", left)
	}
}

// A second connection of the same session replaces the first, which is
// closed with 1000 session_replaced.
func TestSessionReplaced(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	first := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: "same"})
	second := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: "same"})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		_, err := first.Next(ctx)
		var ce *client.CloseError
		if errors.As(err, &ce) {
			if ce.Code != 1000 || ce.Reason != protocol.CloseReasonReplaced {
				t.Fatalf("close %d %q", ce.Code, ce.Reason)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := len(listPeers(t, second)); got != 1 {
		t.Fatalf("%d live sessions after replacement, want 1", got)
	}
}

// Revoking a member closes its live sessions (1008 unauthorized) within 5 s.
func TestRevocationClosesSessions(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	victim := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	start := time.Now()
	if _, err := admin.RevokeMember(context.Background(), n.Store(), mesh.MeshID, mesh.Members[1].Pubkey()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		_, err := victim.Next(ctx)
		var ce *client.CloseError
		if errors.As(err, &ce) {
			if ce.Code != 1008 || ce.Reason != protocol.ReasonUnauthorized {
				t.Fatalf("close %d %q", ce.Code, ce.Reason)
			}
			t.Logf("closed %s after revocation", time.Since(start).Round(time.Millisecond))
			return
		}
		if err != nil {
			t.Fatalf("not closed within 5 s: %v", err)
		}
	}
}

// A session stuck in "working" longer than STATUS_TTL_SECONDS is flipped to
// idle (source jsonl), releasing held messages.
func TestStatusTTLSweep(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.StatusTTLSeconds = 1 }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	rcv := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	testkit.Write(t, rcv, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	testkit.Eventually(t, 5*time.Second, "working", func() bool { return testkit.LiveStatus(n, mesh.Members[1].MemberID) == protocol.StatusWorking })
	ack := testkit.Send(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "aGVsZA=="})
	if p := testkit.ExpectPush(t, rcv, 10*time.Second); p.MessageID != ack.MessageID {
		t.Fatalf("got %+v", p)
	}
	for _, p := range listPeers(t, sender) {
		if p.MemberID == mesh.Members[1].MemberID && (p.Status != "idle" || p.StatusSource != "jsonl") {
			t.Fatalf("after TTL: %s/%s, want idle/jsonl", p.Status, p.StatusSource)
		}
	}
	if n.Counter("broker_ttl_status_flips_total") < 1 {
		t.Fatal("flip not counted")
	}
}

// A hook that arrives before its session connects is applied when that
// (pid, cwd) connects within 10 s.
func TestPendingHook(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	out := testkit.Hook(t, n.HookURL(), `{"cwd":"/early","pid":99,"status":"working"}`, http.StatusOK)
	if out["pending"] != true {
		t.Fatalf("hook response %v, want pending", out)
	}
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{PID: 99, Cwd: "/early"})
	p := listPeers(t, c)
	if len(p) != 1 || p[0].Status != "working" || p[0].StatusSource != "hook" {
		t.Fatalf("pending hook not applied: %+v", p)
	}
}

// A session that stops answering pings is closed 1008 stale.
func TestStaleSession(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) {
		c.PingInterval = 200 * time.Millisecond
		c.PongTimeout = 600 * time.Millisecond
	}})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	alive := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	// A raw connection whose reader we never run cannot answer pings.
	silent := testkit.DialSilent(t, n.URL(), mesh.Members[1], client.HelloOptions{}, 0)
	testkit.Eventually(t, 10*time.Second, "stale close", func() bool {
		return n.Counter("broker_session_closes_total", "reason", protocol.CloseReasonStale) >= 1
	})
	_ = silent
	// The responsive session survives several ping rounds; the stale one
	// leaves the live list.
	testkit.Eventually(t, 5*time.Second, "only the responsive peer live", func() bool { return len(listPeers(t, alive)) == 1 })
}

// An ephemeral connection (a CLI command) receives messages but is not
// listed, announces nothing and does not count toward the cap.
func TestEphemeralSession(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxConnsPerMesh = 1 }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	watcher := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{Capabilities: []string{protocol.CapSystemEvents}})
	eph := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{Capabilities: []string{protocol.CapEphemeral}})
	if peers := listPeers(t, watcher); len(peers) != 1 {
		t.Fatalf("list_peers shows %d sessions, want only the watcher", len(peers))
	}
	ack := testkit.Send(t, watcher, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "aGk="})
	if p := testkit.ExpectPush(t, eph, 5*time.Second); p.MessageID != ack.MessageID {
		t.Fatalf("got %+v", p)
	}
	eph.Close()
	noPush(t, watcher, 300*time.Millisecond) // and no system event either
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if f, err := watcher.Next(ctx); err == nil {
		t.Fatalf("watcher got %s for an ephemeral session", f.Raw)
	}
}

// A reattaching session keeps its groups when its hello names none, and
// takes exactly the hello's groups when it names some (so a group it left
// stays left).
func TestReattachGroups(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	groups := func() []string {
		for _, e := range n.Replica().Live(mesh.MeshID) {
			return e.Groups
		}
		return nil
	}
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: "g", Groups: []string{"a", "b"}})
	testkit.Write(t, c, protocol.GroupOp{Type: protocol.TypeJoinGroup, Name: "c"})
	testkit.Eventually(t, 3*time.Second, "joined c", func() bool { return len(groups()) == 3 })
	c.Close()
	testkit.Eventually(t, 3*time.Second, "in grace", func() bool { return len(n.Replica().Live(mesh.MeshID)) == 0 })
	c = testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: "g"})
	if g := groups(); len(g) != 3 {
		t.Fatalf("reattach without groups: %v, want a b c", g)
	}
	c.Close()
	testkit.Eventually(t, 3*time.Second, "in grace", func() bool { return len(n.Replica().Live(mesh.MeshID)) == 0 })
	testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: "g", Groups: []string{"b"}})
	if g := groups(); len(g) != 1 || g[0] != "b" {
		t.Fatalf("reattach with groups [b]: %v", g)
	}
}
