package peer_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/localstore"
	"github.com/claudemesh/broker/internal/peer"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/profile"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
	"github.com/claudemesh/broker/internal/transcript"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

type env struct {
	n    *testkit.Node
	mesh *testkit.Mesh
}

func newEnv(t *testing.T, names ...string) *env {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 0)
	for _, name := range names {
		mesh.AddMember(t, n.Store(), name)
	}
	return &env{n: n, mesh: mesh}
}

func (e *env) config(t *testing.T, i int, cwd string) peer.Config {
	t.Helper()
	id := e.mesh.Members[i]
	m, err := e.n.Store().GetMesh(context.Background(), e.mesh.MeshID)
	if err != nil {
		t.Fatal(err)
	}
	st, err := localstore.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	return peer.Config{
		Identity: &profile.Identity{Pubkey: id.Pubkey(), SecretKey: hex.EncodeToString(id.Priv)},
		Mesh: &profile.Mesh{MeshID: e.mesh.MeshID, Slug: m.Slug, Name: m.Name, MemberID: id.MemberID,
			DisplayName: e.mesh.Names[i], BrokerURLs: []string{e.n.URL()}, RootKey: m.RootKey, Pubkey: id.Pubkey()},
		Store: st, Cwd: cwd, Persistent: true, Logger: testkit.Logger(),
		Backoff: client.Backoff{Min: 20 * time.Millisecond, Max: 200 * time.Millisecond},
	}
}

func start(t *testing.T, cfg peer.Config) *peer.Session {
	t.Helper()
	s, err := peer.Start(cfg)
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

func TestResolve(t *testing.T) {
	e := newEnv(t, "alice", "bob", "twin", "twin", "carol")
	alice := start(t, e.config(t, 0, "/a"))
	for _, i := range []int{1, 2, 3} {
		start(t, e.config(t, i, fmt.Sprint("/p", i)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	testkit.Eventually(t, 10*time.Second, "peers online", func() bool {
		ps, err := alice.Peers(ctx)
		return err == nil && len(ps) == 4
	})
	bob, carol := e.mesh.Members[1], e.mesh.Members[4]
	for to, want := range map[string]string{
		"bob": bob.Pubkey(), "BOB": bob.Pubkey(), "*": "*", "@backend": "@backend",
		bob.Pubkey(): bob.Pubkey(), fmt.Sprintf("%X", bob.PublicKey()): bob.Pubkey(),
	} {
		got, err := alice.Resolve(ctx, to)
		if err != nil || got != want {
			t.Errorf("Resolve(%q) = %q %v, want %q", to, got, err, want)
		}
	}
	var amb *peer.AmbiguousPeerError
	if _, err := alice.Resolve(ctx, "twin"); !errors.As(err, &amb) || len(amb.Pubkeys) != 2 {
		t.Errorf("twin: %v", err)
	}
	if _, err := alice.Resolve(ctx, "alice"); !errors.Is(err, peer.ErrSelf) {
		t.Errorf("self: %v", err)
	}
	var unknown *peer.UnknownPeerError
	if _, err := alice.Resolve(ctx, "carol"); !errors.As(err, &unknown) || len(unknown.Known) != 2 {
		t.Errorf("offline carol, never seen: %v", err) // known: bob, twin
	}
	if _, err := alice.Resolve(ctx, "@"); err == nil {
		t.Error("bad group accepted")
	}

	// carol comes and goes: afterwards her name still resolves, from the
	// contacts, and a message to her waits for her at the broker.
	c := start(t, e.config(t, 4, "/c"))
	testkit.Eventually(t, 10*time.Second, "carol seen", func() bool {
		_, err := alice.Resolve(ctx, "carol")
		return err == nil
	})
	_ = c.Close()
	testkit.Eventually(t, 10*time.Second, "carol gone", func() bool {
		ps, _ := alice.Peers(ctx)
		for _, p := range ps {
			if p.DisplayName == "carol" {
				return false
			}
		}
		return true
	})
	got, err := alice.Resolve(ctx, "carol")
	if err != nil || got != carol.Pubkey() {
		t.Fatalf("offline carol: %q %v", got, err)
	}
	if _, _, err := alice.Send(ctx, "carol", "see this when you are back", ""); err != nil {
		t.Fatal(err)
	}

	// A one-shot command's connection announces itself as ephemeral: the
	// broker does not list it, even to AllPeers, yet it can send.
	oneShot := e.config(t, 1, "/cli")
	oneShot.Persistent = false
	cmd := start(t, oneShot)
	if _, _, err := cmd.Send(ctx, "alice", "from a one-shot command", ""); err != nil {
		t.Fatal(err)
	}
	all, err := alice.AllPeers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range all {
		if p.Cwd == "/cli" {
			t.Fatalf("the broker lists a one-shot session: %+v", p)
		}
	}
}

// status and summary requests reach a running session through its control
// socket; a registration whose process died is cleaned up.
func TestControl(t *testing.T) {
	e := newEnv(t, "alice", "bob")
	run := t.TempDir()
	alice := start(t, e.config(t, 0, "/proj"))
	bob := start(t, e.config(t, 1, "/b"))
	stop, err := alice.ServeControl(run, "mcp")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	// A stale registration (its socket is gone).
	stale := peer.SessionInfo{MeshID: "m", SessionID: "dead", Socket: filepath.Join(run, "dead.sock")}
	if err := os.WriteFile(filepath.Join(run, "dead.json"), []byte(`{"meshId":"m","sessionId":"dead","socket":"`+stale.Socket+`"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	list, err := peer.Sessions(run)
	if err != nil || len(list) != 1 || list[0].Cwd != "/proj" || list[0].Command != "mcp" || list[0].MeshID != e.mesh.MeshID {
		t.Fatalf("sessions %+v %v", list, err)
	}
	if _, err := os.Stat(filepath.Join(run, "dead.json")); !os.IsNotExist(err) {
		t.Fatal("stale registration kept")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := peer.Send(ctx, list[0], peer.Request{Op: peer.OpSetStatus, Status: "dnd"}); err != nil {
		t.Fatal(err)
	}
	if err := peer.Send(ctx, list[0], peer.Request{Op: peer.OpSetSummary, Summary: "on call"}); err != nil {
		t.Fatal(err)
	}
	if err := peer.Send(ctx, list[0], peer.Request{Op: peer.OpSetStatus, Status: "napping"}); err == nil {
		t.Fatal("bad status accepted")
	}
	if err := peer.Send(ctx, list[0], peer.Request{Op: "reboot"}); err == nil {
		t.Fatal("unknown op accepted")
	}
	testkit.Eventually(t, 10*time.Second, "alice dnd", func() bool {
		ps, _ := bob.Peers(ctx)
		for _, p := range ps {
			if p.DisplayName == "alice" {
				return p.Status == protocol.StatusDND && p.Summary == "on call" && p.StatusSource == protocol.SourceManual
			}
		}
		return false
	})
	stop()
	if list, _ := peer.Sessions(run); len(list) != 0 {
		t.Fatalf("registration kept after stop: %+v", list)
	}
}

// Without hooks, the session's status follows Claude Code's transcript and
// is reported with source jsonl.
func TestInferStatus(t *testing.T) {
	e := newEnv(t, "alice", "bob")
	home := t.TempDir()
	cwd := "/home/alice/my_proj"
	alice := start(t, e.config(t, 0, cwd))
	bob := start(t, e.config(t, 1, "/b"))
	dir := transcript.ProjectDir(home, cwd)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "0b6c-session.jsonl")
	write := func(lines ...string) {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range lines {
			fmt.Fprintln(f, l)
		}
		f.Close()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		alice.InferStatus(ctx, home, 20*time.Millisecond)
	}()
	defer func() { cancel(); <-done }()

	statusOf := func() (string, string) {
		ps, _ := bob.Peers(ctx)
		for _, p := range ps {
			if p.DisplayName == "alice" {
				return p.Status, p.StatusSource
			}
		}
		return "", ""
	}
	write(`{"type":"user","message":{"role":"user","content":"run the tests"}}`,
		`{"type":"assistant","message":{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"Bash","input":{}}]}}`)
	testkit.Eventually(t, 10*time.Second, "working from the transcript", func() bool {
		st, src := statusOf()
		return st == protocol.StatusWorking && src == protocol.SourceJSONL
	})
	write(`{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"ok"}]}}`,
		`{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"All green."}]}}`)
	testkit.Eventually(t, 10*time.Second, "idle from the transcript", func() bool {
		st, src := statusOf()
		return st == protocol.StatusIdle && src == protocol.SourceJSONL
	})
}
