package mcpserver_test

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/localstore"
	"github.com/claudemesh/broker/internal/mcpserver"
	"github.com/claudemesh/broker/internal/peer"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/profile"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// startPeer opens a peer session for a testkit member.
func startPeer(t *testing.T, n *testkit.Node, mesh *testkit.Mesh, i int) *peer.Session {
	t.Helper()
	id := mesh.Members[i]
	m, err := n.Store().GetMesh(context.Background(), mesh.MeshID)
	if err != nil {
		t.Fatal(err)
	}
	st, err := localstore.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := peer.Start(peer.Config{
		Identity: &profile.Identity{Pubkey: id.Pubkey(), SecretKey: hex.EncodeToString(id.Priv)},
		Mesh: &profile.Mesh{MeshID: mesh.MeshID, Slug: m.Slug, Name: m.Name, MemberID: id.MemberID, DisplayName: mesh.Names[i],
			BrokerURLs: []string{n.URL()}, RootKey: m.RootKey, Pubkey: id.Pubkey()},
		Store: st, Cwd: "/work/" + mesh.Names[i], Persistent: true, Logger: testkit.Logger(t), ConnectGrace: 300 * time.Millisecond,
		Backoff: client.Backoff{Min: 20 * time.Millisecond, Max: 200 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

// connect serves s over an in-memory transport and returns the SDK client
// session talking to it.
func connect(t *testing.T, s *mcpserver.Server) *mcp.ClientSession {
	t.Helper()
	cs, _ := connectAs(t, s, "test", nil)
	return cs
}

// connectAs connects a client with the given name and capabilities; the
// channel notifications it receives arrive on the returned channel.
func connectAs(t *testing.T, s *mcpserver.Server, name string, caps *mcp.ClientCapabilities) (*mcp.ClientSession, <-chan mcpserver.ChannelParams) {
	t.Helper()
	ctx := context.Background()
	st, ct := mcp.NewInMemoryTransports()
	ss, err := s.Connect(ctx, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ss.Close() })
	rec := &recordingTransport{Transport: ct, got: make(chan mcpserver.ChannelParams, 16)}
	c := mcp.NewClient(&mcp.Implementation{Name: name, Version: "v0"}, &mcp.ClientOptions{Capabilities: caps})
	cs, err := c.Connect(ctx, rec, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs, rec.got
}

// recordingTransport takes the channel notifications out of what a client
// reads (the SDK's client has no handler for them) and hands them to the
// test.
type recordingTransport struct {
	mcp.Transport
	got chan mcpserver.ChannelParams
}

func (r *recordingTransport) Connect(ctx context.Context) (mcp.Connection, error) {
	c, err := r.Transport.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &recordingConn{Connection: c, got: r.got}, nil
}

type recordingConn struct {
	mcp.Connection
	got chan mcpserver.ChannelParams
}

func (r *recordingConn) Read(ctx context.Context) (jsonrpc.Message, error) {
	for {
		m, err := r.Connection.Read(ctx)
		if err != nil {
			return m, err
		}
		if req, ok := m.(*jsonrpc.Request); ok && req.Method == mcpserver.ChannelMethod {
			var p mcpserver.ChannelParams
			if json.Unmarshal(req.Params, &p) == nil {
				select {
				case r.got <- p:
				default:
				}
			}
			continue
		}
		return m, nil
	}
}

// call invokes a tool and decodes its structured output into out.
func call(t *testing.T, cs *mcp.ClientSession, name string, args map[string]any, out any) *mcp.CallToolResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if out != nil && !res.IsError {
		data, _ := json.Marshal(res.StructuredContent)
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s output %s: %v", name, data, err)
		}
	}
	return res
}

func textOf(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}

// Every tool, driven through the SDK's client against a real broker.
func TestTools(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2) // p0 is served over MCP, p1 is the other peer
	me, other := startPeer(t, n, mesh, 0), startPeer(t, n, mesh, 1)
	cs := connect(t, mcpserver.New(me, mcpserver.Options{Version: "test", MeshName: "test mesh", Self: "p0"}))

	tools := map[string]bool{}
	for tool, err := range cs.Tools(context.Background(), nil) {
		if err != nil {
			t.Fatal(err)
		}
		tools[tool.Name] = true
	}
	for _, name := range []string{"send_message", "list_peers", "list_members", "check_messages", "set_status", "set_summary", "join_group", "leave_group"} {
		if !tools[name] {
			t.Errorf("tool %s missing (have %v)", name, tools)
		}
	}

	// list_peers
	var peers mcpserver.ListPeersOutput
	res := call(t, cs, "list_peers", nil, &peers)
	if res.IsError || len(peers.Peers) != 2 || !strings.Contains(textOf(res), "p1") {
		t.Fatalf("list_peers: %+v %s", peers, textOf(res))
	}
	for _, p := range peers.Peers {
		if p.You != (p.Name == "p0") {
			t.Errorf("peer %s you=%v", p.Name, p.You)
		}
	}

	// send_message by name, and to everyone
	var sent mcpserver.SendOutput
	res = call(t, cs, "send_message", map[string]any{"to": "p1", "message": "can you review?", "priority": "now"}, &sent)
	if res.IsError || sent.Status != "sent" || sent.MessageID == "" || sent.Target != other.Pubkey() {
		t.Fatalf("send_message: %+v %s", sent, textOf(res))
	}
	call(t, cs, "send_message", map[string]any{"to": "*", "message": "standup in 5"}, &sent)
	testkit.Eventually(t, 10*time.Second, "p1 received both", func() bool {
		msgs, _ := other.Local().Messages(false, 0)
		return len(msgs) == 2
	})
	got, _ := other.TakeMessages(0)
	if got[0].Text != "can you review?" || got[0].Priority != "now" || got[1].Text != "standup in 5" || got[1].Kind != client.KindBroadcast {
		t.Fatalf("p1 got %+v", got)
	}

	// check_messages
	if _, _, err := other.Send(context.Background(), "p0", "yes, on it", ""); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "p0 received the reply", func() bool {
		msgs, _ := me.Local().Messages(false, 0)
		return len(msgs) == 1
	})
	var inbox mcpserver.CheckOutput
	res = call(t, cs, "check_messages", nil, &inbox)
	if res.IsError || len(inbox.Messages) != 1 || inbox.Messages[0].Text != "yes, on it" || inbox.Messages[0].From != "p1" ||
		!strings.Contains(textOf(res), "From p1 ("+other.Pubkey()[:8]+")") {
		t.Fatalf("check_messages: %+v %s", inbox, textOf(res))
	}
	res = call(t, cs, "check_messages", nil, &inbox)
	if len(inbox.Messages) != 0 || textOf(res) != "No new messages." {
		t.Fatalf("second check_messages: %+v %s", inbox, textOf(res))
	}

	// A "next" message to a busy peer: the result says it is held.
	if err := other.SetStatus(context.Background(), protocol.StatusWorking); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "p1 working", func() bool {
		ps, _ := me.Peers(context.Background())
		for _, p := range ps {
			if p.DisplayName == "p1" {
				return p.Status == protocol.StatusWorking
			}
		}
		return false
	})
	res = call(t, cs, "send_message", map[string]any{"to": "p1", "message": "when you can"}, &sent)
	if res.IsError || len(sent.HeldFor) != 1 || sent.HeldFor[0] != "p1" || !strings.Contains(textOf(res), "Held for p1") {
		t.Fatalf("send to a busy peer: %+v %s", sent, textOf(res))
	}

	// set_status and set_summary, seen by the other peer
	var st mcpserver.StatusOutput
	if res := call(t, cs, "set_status", map[string]any{"status": "dnd"}, &st); res.IsError || st.Status != "dnd" {
		t.Fatalf("set_status: %s", textOf(res))
	}
	var sum mcpserver.SummaryOutput
	if res := call(t, cs, "set_summary", map[string]any{"summary": "migrating the store"}, &sum); res.IsError {
		t.Fatalf("set_summary: %s", textOf(res))
	}
	testkit.Eventually(t, 10*time.Second, "status and summary visible", func() bool {
		ps, err := other.Peers(context.Background())
		if err != nil {
			return false
		}
		for _, p := range ps {
			if p.DisplayName == "p0" {
				return p.Status == protocol.StatusDND && p.StatusSource == protocol.SourceManual && p.Summary == "migrating the store"
			}
		}
		return false
	})

	// list_members, and groups joined and left.
	var members mcpserver.ListMembersOutput
	if res := call(t, cs, "list_members", nil, &members); res.IsError || len(members.Members) != 2 || !strings.Contains(textOf(res), "p1 ("+other.Pubkey()[:8]+"): online") {
		t.Fatalf("list_members: %+v %s", members, textOf(res))
	}
	var groups mcpserver.GroupsOutput
	if res := call(t, cs, "join_group", map[string]any{"name": "@reviewers"}, &groups); res.IsError || len(groups.Groups) != 1 || groups.Groups[0] != "reviewers" {
		t.Fatalf("join_group: %+v %s", groups, textOf(res))
	}
	testkit.Eventually(t, 10*time.Second, "p0 in @reviewers", func() bool {
		ps, _ := other.Peers(context.Background())
		for _, p := range ps {
			if p.DisplayName == "p0" {
				return len(p.Groups) == 1 && p.Groups[0] == "reviewers"
			}
		}
		return false
	})
	// p0 is dnd: only "now" gets through.
	if _, _, err := other.Send(context.Background(), "@reviewers", "group hello", protocol.PriorityNow); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "group message", func() bool {
		msgs, _ := me.Local().Messages(false, 0)
		return len(msgs) == 1 && msgs[0].Text == "group hello"
	})
	if res := call(t, cs, "leave_group", map[string]any{"name": "reviewers"}, &groups); res.IsError || len(groups.Groups) != 0 {
		t.Fatalf("leave_group: %+v %s", groups, textOf(res))
	}

	// Errors are tool errors with a useful text.
	for _, tc := range []struct {
		tool string
		args map[string]any
		want string
	}{
		{"send_message", map[string]any{"to": "nobody", "message": "hi"}, `unknown member "nobody"`},
		{"join_group", map[string]any{"name": "@"}, "group name"},
		{"send_message", map[string]any{"to": "p1", "message": "  "}, "empty"},
		{"send_message", map[string]any{"to": "p1", "message": "x", "priority": "urgent"}, "priority"},
		{"set_status", map[string]any{"status": "asleep"}, "status"},
		{"set_summary", map[string]any{"summary": strings.Repeat("x", 600)}, "512"},
	} {
		res := call(t, cs, tc.tool, tc.args, nil)
		if !res.IsError || !strings.Contains(textOf(res), tc.want) {
			t.Errorf("%s %v: error=%v %q, want %q", tc.tool, tc.args, res.IsError, textOf(res), tc.want)
		}
	}
}

// When the broker is gone, send_message answers that the message is queued
// (it stays in the outbox) instead of failing.
func TestSendQueuedWhileDisconnected(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	me := startPeer(t, n, mesh, 0)
	cs := connect(t, mcpserver.New(me, mcpserver.Options{SendTimeout: 300 * time.Millisecond}))
	n.Kill()
	testkit.Eventually(t, 10*time.Second, "disconnected", func() bool {
		_, ok := me.Client().Info()
		return !ok
	})
	var sent mcpserver.SendOutput
	res := call(t, cs, "send_message", map[string]any{"to": mesh.Members[1].Pubkey(), "message": "later"}, &sent)
	if res.IsError || sent.Status != "queued" {
		t.Fatalf("send_message: %+v %s", sent, textOf(res))
	}
	pending, err := me.Local().Pending()
	if err != nil || len(pending) != 1 || pending[0].Text != "later" {
		t.Fatalf("outbox %+v %v", pending, err)
	}
	res = call(t, cs, "list_peers", nil, nil)
	if !res.IsError || !strings.Contains(textOf(res), "not connected") {
		t.Fatalf("list_peers while disconnected: %s", textOf(res))
	}
}
