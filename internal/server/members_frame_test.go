package server_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func listMembers(t *testing.T, c *client.Conn, after string, limit int) (protocol.MembersList, protocol.ErrorFrame) {
	t.Helper()
	testkit.Write(t, c, protocol.ListMembers{Type: protocol.TypeListMembers, ReqID: "m", After: after, Limit: limit})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for members_list: %v", err)
		}
		switch f.Type {
		case protocol.TypeMembersList:
			var ml protocol.MembersList
			if err := f.Decode(&ml); err != nil {
				t.Fatal(err)
			}
			return ml, protocol.ErrorFrame{}
		case protocol.TypeError:
			var e protocol.ErrorFrame
			_ = f.Decode(&e)
			return protocol.MembersList{}, e
		}
	}
}

// list_members lists every live member, online or not, in pages; online
// means a visible session (a send-only or ephemeral connection is not one).
func TestListMembers(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 4)
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{Capabilities: []string{protocol.CapSendOnly}})
	testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{Capabilities: []string{protocol.CapEphemeral}})

	ml, e := listMembers(t, c, "", 0)
	if e.Code != "" || len(ml.Members) != 4 || ml.Next != "" {
		t.Fatalf("members %+v, error %+v; want 4 members on one page", ml, e)
	}
	online := map[string]bool{}
	for _, m := range ml.Members {
		online[m.DisplayName] = m.Online
		if m.Role != "member" || len(m.Pubkey) != 64 || m.JoinedAt == "" {
			t.Fatalf("member fields %+v", m)
		}
	}
	if !online["p0"] || online["p1"] || online["p2"] || online["p3"] {
		t.Fatalf("online flags %v: only p0 has a visible session", online)
	}

	// Pages of 3 then 1, in id order, with a cursor.
	first, _ := listMembers(t, c, "", 3)
	if len(first.Members) != 3 || first.Next == "" {
		t.Fatalf("first page %+v", first)
	}
	second, _ := listMembers(t, c, first.Next, 3)
	if len(second.Members) != 1 || second.Next != "" || second.Members[0].MemberID <= first.Next {
		t.Fatalf("second page %+v after %s", second, first.Next)
	}

	if _, e := listMembers(t, c, "bad\x00cursor", 0); e.Code != protocol.CodeMalformed {
		t.Fatalf("NUL in after: %+v, want malformed", e)
	}
	if _, e := listMembers(t, c, "", -1); e.Code != protocol.CodeMalformed {
		t.Fatalf("negative limit: %+v, want malformed", e)
	}
}

// One session asking in a loop is refused (counted) without slowing
// another session's listing.
func TestListMembersRateLimited(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	flood := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	honest := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 200 {
			if err := flood.WriteJSON(context.Background(), protocol.ListMembers{Type: protocol.TypeListMembers}); err != nil {
				return
			}
		}
	}()
	for i := range 5 {
		ml, e := listMembers(t, honest, "", 0)
		if e.Code != "" || len(ml.Members) != 2 {
			t.Fatalf("honest listing %d during the flood: %+v %+v", i, ml, e)
		}
	}
	<-done
	testkit.Eventually(t, 5*time.Second, "rate limit counted", func() bool {
		return n.Counter("broker_requests_rate_limited_total", "type", protocol.TypeListMembers) > 0
	})
}

// A send-only session is never handed a message: a "next" message held
// for the member's working session survives any number of the member's
// send-only connections, and reaches that session when it turns idle. The
// send-only sessions are invisible, take no pending hook and are never a
// hook's target.
func TestSendOnlyNeverReceives(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxConnsPerMesh = 3 }})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	alice, bob := mesh.Members[0], mesh.Members[1]
	sender := testkit.Connect(t, n.URL(), alice, client.HelloOptions{})
	listen := testkit.Connect(t, n.URL(), bob, client.HelloOptions{PID: 777, Cwd: "/work/bob", Capabilities: []string{protocol.CapClientAck}})
	watcher := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{Capabilities: []string{protocol.CapSystemEvents}})
	testkit.Write(t, listen, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	testkit.Eventually(t, 5*time.Second, "bob working", func() bool { return testkit.LiveStatus(n, bob.MemberID) == protocol.StatusWorking })

	held := testkit.Send(t, sender, protocol.Send{TargetSpec: bob.Pubkey(), Priority: "next", Ciphertext: "aGVsZA=="})
	for i := range 5 {
		// Same pid and folder as the listening session, as a command run
		// from inside Claude Code would have; the mesh's cap (3) is full.
		cmd := testkit.Connect(t, n.URL(), bob, client.HelloOptions{PID: 777, Cwd: "/work/bob",
			Capabilities: []string{protocol.CapSendOnly, protocol.CapEphemeral, protocol.CapClientAck, protocol.CapSystemEvents}})
		if peers := listPeers(t, cmd); len(peers) != 3 {
			t.Fatalf("command %d sees %d peers, want the three visible sessions", i, len(peers))
		}
		ack := testkit.Send(t, cmd, protocol.Send{TargetSpec: alice.Pubkey(), Ciphertext: "ZnJvbSBib2I="})
		if p := testkit.ExpectPush(t, sender, 5*time.Second); p.MessageID != ack.MessageID {
			t.Fatalf("alice got %+v, want bob's message %s", p, ack.MessageID)
		}
		// A signed hook for bob's folder and pid goes to the listening
		// session, not to the newer command.
		res, err := client.PostHook(context.Background(), http.DefaultClient, n.URL(), bob,
			client.HookStatus{Cwd: "/work/bob", PID: ptr(int64(777)), Status: protocol.StatusWorking})
		if err != nil || res.PresenceID == "" {
			t.Fatalf("hook: %+v %v", res, err)
		}
		if e, _ := n.Replica().Get(res.PresenceID); e.SendOnly {
			t.Fatalf("the hook chose the send-only session %s", res.PresenceID)
		}
		noPush(t, cmd, 200*time.Millisecond)
		if st := messageStatus(t, cmd, held.MessageID); len(st.Recipients) != 1 || st.Recipients[0].State != protocol.StateHeld {
			t.Fatalf("held message state %+v, want held", st)
		}
		cmd.Close()
	}
	// The watcher heard of no command coming or going.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	for {
		f, err := watcher.Next(ctx)
		if err != nil {
			break
		}
		var p protocol.Push
		if f.Decode(&p) == nil && (p.Event == protocol.EventPeerJoined || p.Event == protocol.EventPeerLeft) {
			t.Fatalf("watcher got %s", f.Raw)
		}
	}

	testkit.Write(t, listen, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusIdle})
	if p := testkit.ExpectPush(t, listen, 5*time.Second); p.MessageID != held.MessageID {
		t.Fatalf("listening session got %+v, want the held message %s", p, held.MessageID)
	}
}

// A hook that arrived before its session is kept for that session: a
// send-only command connecting first from the same folder does not take it.
func TestSendOnlyLeavesPendingHook(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	id := mesh.Members[0]
	if _, err := client.PostHook(context.Background(), http.DefaultClient, n.URL(), id,
		client.HookStatus{Cwd: "/early", PID: ptr(int64(99)), Status: protocol.StatusWorking}); err != nil {
		t.Fatal(err)
	}
	testkit.Connect(t, n.URL(), id, client.HelloOptions{PID: 99, Cwd: "/early", Capabilities: []string{protocol.CapSendOnly}})
	c := testkit.Connect(t, n.URL(), id, client.HelloOptions{PID: 99, Cwd: "/early"})
	p := listPeers(t, c)
	if len(p) != 1 || p[0].Status != protocol.StatusWorking || p[0].StatusSource != protocol.SourceHook {
		t.Fatalf("pending hook not applied to the session: %+v", p)
	}
}

// Across nodes: bob's listening session on node A is working; bob's
// send-only commands on node B neither receive the held message nor turn
// the remote fast path away from the listening session, which gets it when
// it turns idle; a "now" message reaches it at once meanwhile.
func TestSendOnlyAcrossNodes(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	a, b := nodes[0], nodes[1]
	mesh := testkit.NewMesh(t, a.Store(), 2)
	alice, bob := mesh.Members[0], mesh.Members[1]
	listen := testkit.Connect(t, a.URL(), bob, client.HelloOptions{Capabilities: []string{protocol.CapClientAck}})
	testkit.Write(t, listen, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	sender := testkit.Connect(t, b.URL(), alice, client.HelloOptions{})
	testkit.Eventually(t, 5*time.Second, "bob working on both nodes", func() bool {
		return testkit.LiveStatus(a, bob.MemberID) == protocol.StatusWorking && testkit.LiveStatus(b, bob.MemberID) == protocol.StatusWorking
	})
	held := testkit.Send(t, sender, protocol.Send{TargetSpec: bob.Pubkey(), Priority: "next", Ciphertext: "bmV4dA=="})
	var cmds []*client.Conn
	for range 3 {
		cmd := testkit.Connect(t, b.URL(), bob, client.HelloOptions{Capabilities: []string{protocol.CapSendOnly, protocol.CapClientAck}})
		cmds = append(cmds, cmd)
		testkit.Eventually(t, 5*time.Second, "command replicated", func() bool {
			return len(a.Replica().MemberEntries(bob.MemberID)) == len(cmds)+1
		})
	}
	// The listening session is still the member's only receiving session,
	// so a "now" message takes the remote fast path to it.
	urgent := testkit.Send(t, sender, protocol.Send{TargetSpec: bob.Pubkey(), Priority: "now", Ciphertext: "bm93"})
	if p := testkit.ExpectPush(t, listen, 5*time.Second); p.MessageID != urgent.MessageID {
		t.Fatalf("listening session got %+v, want the now message", p)
	}
	for _, cmd := range cmds {
		noPush(t, cmd, 200*time.Millisecond)
	}
	if st := messageStatus(t, sender, held.MessageID); st.Recipients[0].State != protocol.StateHeld {
		t.Fatalf("held message %+v", st)
	}
	for _, cmd := range cmds {
		cmd.Close()
	}
	testkit.Write(t, listen, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusIdle})
	if p := testkit.ExpectPush(t, listen, 5*time.Second); p.MessageID != held.MessageID {
		t.Fatalf("listening session got %+v, want the held message", p)
	}
}

func ptr[T any](v T) *T { return &v }
