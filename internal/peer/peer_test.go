package peer_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
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
		Store: st, Cwd: cwd, Persistent: true, Logger: testkit.Logger(t),
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
	e := newEnv(t, "alice", "bob", "carol", "Dave")
	alice := start(t, e.config(t, 0, "/a"))
	start(t, e.config(t, 1, "/p1"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bob, carol, dave := e.mesh.Members[1], e.mesh.Members[2], e.mesh.Members[3]
	for to, want := range map[string]string{
		"bob": bob.Pubkey(), "BOB": bob.Pubkey(), "*": "*", "@backend": "@backend",
		bob.Pubkey(): bob.Pubkey(), fmt.Sprintf("%X", bob.PublicKey()): bob.Pubkey(),
		// Members who never connected are addressable by name: the
		// broker's member list knows them.
		"carol": carol.Pubkey(), "dave": dave.Pubkey(),
		// The form names are shown in.
		"bob (" + bob.Pubkey()[:8] + ")": bob.Pubkey(),
	} {
		got, err := alice.Resolve(ctx, to)
		if err != nil || got != want {
			t.Errorf("Resolve(%q) = %q %v, want %q", to, got, err, want)
		}
	}
	if _, err := alice.Resolve(ctx, "bob ("+carol.Pubkey()[:8]+")"); err == nil {
		t.Error("a name with another member's fingerprint resolved")
	}
	if _, err := alice.Resolve(ctx, "alice"); !errors.Is(err, peer.ErrSelf) {
		t.Errorf("self: %v", err)
	}
	var unknown *peer.UnknownPeerError
	if _, err := alice.Resolve(ctx, "erin"); !errors.As(err, &unknown) || !unknown.Members || len(unknown.Known) != 3 {
		t.Errorf("erin, not a member: %v", err) // members: bob, carol, Dave
	}
	if _, err := alice.Resolve(ctx, "@"); err == nil {
		t.Error("bad group accepted")
	}
	// Offline with the broker out of reach, names still resolve from the
	// members listed before, and the message waits in the outbox.
	if _, _, err := alice.Send(ctx, "carol", "see this when you are back", ""); err != nil {
		t.Fatal(err)
	}

	// A one-shot command's connection announces itself as ephemeral: the
	// broker does not list it, even to AllPeers, yet it can send.
	oneShot := e.config(t, 1, "/cli")
	oneShot.Persistent, oneShot.SendOnly = false, true
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
	ms, err := cmd.Members(ctx)
	if err != nil || len(ms) != 4 {
		t.Fatalf("members %+v %v", ms, err)
	}
	for _, m := range ms {
		if want := m.DisplayName == "alice" || m.DisplayName == "bob"; m.Online != want {
			t.Errorf("member %s online=%v, want %v (carol and Dave never connected)", m.DisplayName, m.Online, want)
		}
		if m.Me != (m.Pubkey == bob.Pubkey()) {
			t.Errorf("member %s me=%v", m.DisplayName, m.Me)
		}
	}
}

// The member list outranks whatever else a name could mean: a key the
// local contacts once saw under a member's name, online now, never receives
// a message addressed to that (offline) member; a session whose name
// differs from it only by invisible characters or case makes the name
// ambiguous instead of receiving it.
func TestResolvePrefersMembers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	t.Run("stale contact online", func(t *testing.T) {
		e := newEnv(t, "sender", "alice", "mallory")
		sender := start(t, e.config(t, 0, "/s"))
		start(t, e.config(t, 2, "/mallory")) // online; the real alice is not
		realAlice, mallory := e.mesh.Members[1], e.mesh.Members[2]
		if err := sender.Local().RememberPeers([]localstore.Contact{{Pubkey: mallory.Pubkey(), Name: "alice"}}); err != nil {
			t.Fatal(err)
		}
		got, err := sender.Resolve(ctx, "alice")
		if err != nil || got != realAlice.Pubkey() {
			t.Fatalf("alice resolved to %q (%v), want the member %s, not mallory %s", got, err, realAlice.Pubkey(), mallory.Pubkey())
		}
	})
	t.Run("look-alike online", func(t *testing.T) {
		e := newEnv(t, "sender", "alice", "AL\u200bICE")
		sender := start(t, e.config(t, 0, "/s"))
		start(t, e.config(t, 2, "/mallory"))
		realAlice := e.mesh.Members[1]
		var amb *peer.AmbiguousPeerError
		_, err := sender.Resolve(ctx, "alice")
		if !errors.As(err, &amb) || len(amb.Pubkeys) != 2 {
			t.Fatalf("alice with a look-alike online: %v, want an ambiguity listing both", err)
		}
		for _, n := range amb.Names {
			if strings.ContainsRune(n, 0x200b) {
				t.Fatalf("the ambiguity shows an invisible character: %q", n)
			}
		}
		got, err := sender.Resolve(ctx, "alice ("+realAlice.Pubkey()[:8]+")")
		if err != nil || got != realAlice.Pubkey() {
			t.Fatalf("alice by fingerprint: %q %v", got, err)
		}
	})
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
	ctx0, cancel0 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel0()
	statusOf := func() (string, string) {
		ps, _ := bob.Peers(ctx0)
		for _, p := range ps {
			if p.DisplayName == "alice" {
				return p.Status, p.StatusSource
			}
		}
		return "", ""
	}
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

	// No transcript yet: the session says idle itself, rather than leave
	// the broker's default (idle from a transcript) standing.
	testkit.Eventually(t, 10*time.Second, "idle, not from a transcript", func() bool {
		st, src := statusOf()
		return st == protocol.StatusIdle && src == protocol.SourceManual
	})
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

// The control socket's fallback folder in the shared temporary directory
// is refused when another user owns it or it is a link, and tightened when
// its mode lets others in.
func TestPrivateSocketDir(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	long := filepath.Join(t.TempDir(), strings.Repeat("r", 120))
	dir := filepath.Join(tmp, fmt.Sprintf("claudemesh-%d", os.Getuid()))

	// Missing: created 0700.
	p, err := peer.SocketPath(long, "s1")
	if err != nil || filepath.Dir(p) != dir {
		t.Fatalf("socket path %q %v", p, err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("folder %v %v", fi, err)
	}
	// Pre-created open to everyone: tightened.
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := peer.SocketPath(long, "s1"); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("mode %v after reuse, want 0700", fi.Mode().Perm())
	}
	// Owned by someone else: refused (the check is given another uid, so
	// no root is needed to stage it).
	if err := peer.PrivateDir(dir, os.Getuid()+1); err == nil || !strings.Contains(err.Error(), "another user") {
		t.Fatalf("a folder of another user accepted: %v", err)
	}
	// A link planted in its place: refused.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := os.Symlink(target, dir); err != nil {
		t.Fatal(err)
	}
	if _, err := peer.SocketPath(long, "s1"); err == nil || !strings.Contains(err.Error(), "not a folder") {
		t.Fatalf("a link accepted: %v", err)
	}
}
