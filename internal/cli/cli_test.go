package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/cli"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// user is one person with their own home and claudemesh folder.
type user struct {
	t    *testing.T
	home string
	cwd  string
	now  func() time.Time
}

func newUser(t *testing.T, name string) *user {
	home := t.TempDir()
	cwd := filepath.Join(home, "src", name)
	if err := os.MkdirAll(cwd, 0o755); err != nil {
		t.Fatal(err)
	}
	return &user{t: t, home: home, cwd: cwd}
}

func (u *user) env(stdin string, stdout, stderr *bytes.Buffer) cli.Env {
	return cli.Env{
		Stdin: strings.NewReader(stdin), Stdout: stdout, Stderr: stderr,
		Getenv: func(k string) string {
			if k == "USER" {
				return "tester"
			}
			return ""
		},
		Home: u.home, Cwd: u.cwd, Hostname: "testhost", Executable: "/usr/local/bin/claudemesh",
		SessionPID: func() (int, bool) { return 0, false },
		Now:        u.now,
	}
}

// result is a finished command.
type result struct {
	code           int
	stdout, stderr string
}

func (u *user) runIn(ctx context.Context, stdin string, args ...string) result {
	var out, errb bytes.Buffer
	code := cli.Run(ctx, args, u.env(stdin, &out, &errb))
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

func (u *user) run(args ...string) result {
	u.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return u.runIn(ctx, "", args...)
}

// ok runs a command that must succeed.
func (u *user) ok(args ...string) string {
	u.t.Helper()
	r := u.run(args...)
	if r.code != 0 {
		u.t.Fatalf("claudemesh %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// fail runs a command that must fail with a message containing want.
func (u *user) fail(want string, args ...string) result {
	u.t.Helper()
	r := u.run(args...)
	if r.code == 0 || !strings.Contains(r.stderr, want) {
		u.t.Fatalf("claudemesh %s: exit %d, stderr %q; want failure mentioning %q", strings.Join(args, " "), r.code, r.stderr, want)
	}
	return r
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
	return v
}

// background runs a long command (listen) until stop is called.
type background struct {
	cancel context.CancelFunc
	done   chan result
}

func (u *user) start(args ...string) *background {
	ctx, cancel := context.WithCancel(context.Background())
	b := &background{cancel: cancel, done: make(chan result, 1)}
	go func() { b.done <- u.runIn(ctx, "", args...) }()
	u.t.Cleanup(func() { b.stop(u.t) })
	return b
}

func (b *background) stop(t *testing.T) result {
	t.Helper()
	b.cancel()
	select {
	case r := <-b.done:
		b.done <- r
		return r
	case <-time.After(15 * time.Second):
		t.Fatal("background command did not stop")
	}
	return result{}
}

func (b *background) wait(t *testing.T, timeout time.Duration) result {
	t.Helper()
	select {
	case r := <-b.done:
		b.done <- r
		return r
	case <-time.After(timeout):
		t.Fatal("background command did not finish")
	}
	return result{}
}

type fixture struct {
	node        *testkit.Node
	alice, bob  *user
	mesh        admin.MeshCreated
	alicePubkey string
}

// setup starts a broker, creates a mesh, and has alice and bob join it
// through the CLI with invites.
func setup(t *testing.T) *fixture {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "Team Mesh", "team")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{node: n, alice: newUser(t, "alice"), bob: newUser(t, "bob"), mesh: mesh}

	// alice creates her key first; bob lets join create his.
	kg := decode[map[string]string](t, f.alice.ok("keygen", "--json"))
	f.alicePubkey = kg["pubkey"]
	if !protocol.IsPubkeyHex(f.alicePubkey) {
		t.Fatalf("keygen pubkey %q", f.alicePubkey)
	}
	f.alice.fail("already exists", "keygen")

	for _, u := range []*user{f.alice, f.bob} {
		inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Hour, "member", n.URL())
		if err != nil {
			t.Fatal(err)
		}
		name := filepath.Base(u.cwd)
		j := decode[map[string]any](t, u.ok("join", inv.Token, "--name", name, "--json"))
		if j["slug"] != "team" || j["displayName"] != name || j["alreadyMember"] != false {
			t.Fatalf("join: %v", j)
		}
		if got := j["identityCreated"]; got != (u == f.bob) {
			t.Fatalf("identityCreated = %v", got)
		}
	}
	return f
}

func TestConfigFilesArePrivate(t *testing.T) {
	f := setup(t)
	f.bob.ok("outbox") // creates the state file
	dir := filepath.Join(f.bob.home, ".claudemesh")
	for name, want := range map[string]os.FileMode{".": 0o700, "identity.json": 0o600, "meshes.json": 0o600, "state.db": 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
	meshes := decode[[]map[string]any](t, f.bob.ok("meshes", "--json"))
	if len(meshes) != 1 || meshes[0]["slug"] != "team" || meshes[0]["default"] != true || meshes[0]["meshRootKey"] != nil {
		t.Fatalf("meshes: %v", meshes)
	}
	if out := f.bob.ok("meshes"); !strings.Contains(out, "team") || !strings.Contains(out, "bob") {
		t.Fatalf("meshes table: %s", out)
	}
}

// Two identities: send and receive (listen and inbox), peers, status and
// summary of a running session, and the unknown-name error.
func TestSendInboxPeersStatus(t *testing.T) {
	f := setup(t)
	alice, bob := f.alice, f.bob

	listen := bob.start("listen", "--count", "1", "--json", "--no-events", "--timeout", "20s")
	testkit.Eventually(t, 10*time.Second, "bob online", func() bool {
		return strings.Contains(alice.ok("peers"), "bob")
	})
	sent := decode[map[string]any](t, alice.ok("send", "bob", "hello", "bob", "--json"))
	if sent["messageId"] == "" || sent["target"] == "" {
		t.Fatalf("send: %v", sent)
	}
	r := listen.wait(t, 20*time.Second)
	if r.code != 0 {
		t.Fatalf("listen: %d %s", r.code, r.stderr)
	}
	msg := decode[map[string]any](t, strings.TrimSpace(r.stdout))
	if msg["type"] != "message" || msg["text"] != "hello bob" || msg["fromName"] != "alice" || msg["kind"] != "direct" ||
		msg["id"] != sent["messageId"] || msg["from"] != f.alicePubkey {
		t.Fatalf("listen got %v", msg)
	}

	// A running session (here listen) takes status and summary from the CLI.
	session := bob.start("listen")
	testkit.Eventually(t, 10*time.Second, "status reaches bob's session", func() bool {
		return bob.run("status", "dnd").code == 0
	})
	bob.ok("summary", "writing", "the", "tests")
	testkit.Eventually(t, 10*time.Second, "bob dnd in peers", func() bool {
		for _, p := range decode[[]map[string]any](t, alice.ok("peers", "--json")) {
			if p["displayName"] == "bob" && p["status"] == "dnd" && p["statusSource"] == "manual" && p["summary"] == "writing the tests" {
				return true
			}
		}
		return false
	})
	table := alice.ok("peers")
	if !strings.Contains(table, "dnd (manual)") || !strings.Contains(table, "writing the tests") || strings.Contains(table, "alice") {
		t.Fatalf("peers table:\n%s", table)
	}
	// Another folder has no session.
	other := *bob
	other.cwd = filepath.Join(bob.home, "elsewhere")
	other.fail("no claudemesh session", "status", "idle")
	if r := other.ok("status", "idle", "--all", "--json"); !strings.Contains(r, bob.cwd) {
		t.Fatalf("status --all: %s", r)
	}
	session.stop(t)

	// bob is offline: the message waits at the broker; inbox fetches it.
	bobKey := decode[[]map[string]any](t, bob.ok("meshes", "--json"))[0]["pubkey"].(string)
	alice.ok("send", bobKey, "are you there?", "-p", "now")
	msgs := decode[[]client.Message](t, bob.ok("inbox", "--json"))
	if len(msgs) != 1 || msgs[0].Text != "are you there?" || msgs[0].Priority != "now" {
		t.Fatalf("inbox: %+v", msgs)
	}
	if out := bob.ok("inbox"); !strings.Contains(out, "no new messages") {
		t.Fatalf("second inbox: %s", out)
	}
	if out := bob.ok("inbox", "--all", "--offline"); !strings.Contains(out, "are you there?") || !strings.Contains(out, "hello bob") {
		t.Fatalf("inbox --all: %s", out)
	}

	f2 := alice.fail(`unknown member "carol"`, "send", "carol", "hi")
	if !strings.Contains(f2.stderr, "bob") {
		t.Fatalf("unknown peer error does not list known peers: %s", f2.stderr)
	}
	alice.fail("empty message", "send", "bob", " ")
}

// A send while the broker is unreachable is kept in the outbox and sent —
// once — by the next command that reaches the broker.
func TestOutboxSurvivesUnreachableBroker(t *testing.T) {
	f := setup(t)
	alice, bob := f.alice, f.bob
	// alice has seen bob (contacts), so his name resolves offline.
	listen := bob.start("listen")
	testkit.Eventually(t, 10*time.Second, "bob online", func() bool {
		return strings.Contains(alice.ok("peers"), "bob")
	})
	listen.stop(t)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "ws://" + ln.Addr().String() + "/ws"
	ln.Close()
	r := alice.fail("cannot reach the broker", "--broker", dead, "send", "bob", "written offline")
	if !strings.Contains(r.stderr, "saved in the outbox") {
		t.Fatalf("stderr: %s", r.stderr)
	}
	ob := decode[map[string][]map[string]any](t, alice.ok("outbox", "--json"))
	if len(ob["pending"]) != 1 || ob["pending"][0]["text"] != "written offline" {
		t.Fatalf("outbox: %v", ob)
	}
	// A name nobody has seen cannot be resolved offline.
	alice.fail(`unknown peer "dave"`, "--broker", dead, "send", "dave", "x")

	alice.ok("send", "bob", "written online")
	ob = decode[map[string][]map[string]any](t, alice.ok("outbox", "--json"))
	if len(ob["pending"]) != 0 {
		t.Fatalf("outbox after reconnect: %v", ob)
	}
	msgs := decode[[]client.Message](t, bob.ok("inbox", "--json"))
	if len(msgs) != 2 || msgs[0].Text != "written offline" || msgs[1].Text != "written online" {
		t.Fatalf("inbox: %+v", msgs)
	}
}

func TestJoinErrors(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "m", "")
	if err != nil {
		t.Fatal(err)
	}
	u := newUser(t, "carol")
	u.fail("not joined to any mesh", "send", "bob", "hi")
	u.fail("not joined to any mesh", "peers")

	inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Hour, "member", n.URL())
	if err != nil {
		t.Fatal(err)
	}
	tampered := inv.Token[:len(inv.Token)-6] + "AAAAAA"
	if tampered == inv.Token {
		tampered = inv.Token[:len(inv.Token)-6] + "BBBBBB"
	}
	u.fail("invite", "join", tampered)

	// Expired by the clock of this machine: refused before any request.
	u.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	u.fail("expired", "join", inv.Token)

	// Expired by the broker's clock: the broker's 410 is explained.
	short, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Millisecond, "member", n.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.now = func() time.Time { return time.Now().Add(-time.Hour) }
	if r := u.fail("the invite has expired; ask the mesh owner for a new one", "join", short.Token); strings.Contains(r.stderr, "(it expired") {
		t.Fatalf("refused by the client, not the broker: %s", r.stderr)
	}

	// Used up.
	u.now = nil
	u.ok("join", inv.Token, "--name", "carol")
	other := newUser(t, "dan")
	other.fail("used as many times", "join", inv.Token)

	// Unreachable broker.
	inv2, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Hour, "member", "ws://127.0.0.1:1/ws")
	r := other.fail("cannot reach the broker", "join", inv2.Token, "--wait", "1s")
	if !strings.Contains(r.stderr, "--broker ws://host:port/ws") {
		t.Fatalf("unreachable broker: no hint about --broker: %s", r.stderr)
	}
}

// The hook reports the Claude Code event's status for the session in the
// hook's cwd, and tells Claude about unread messages.
func TestHook(t *testing.T) {
	f := setup(t)
	alice, bob := f.alice, f.bob
	session := bob.start("listen", "--no-events")
	testkit.Eventually(t, 10*time.Second, "bob online", func() bool {
		return strings.Contains(alice.ok("peers"), "bob")
	})
	ev := `{"session_id":"cc-1","transcript_path":"/x.jsonl","cwd":"` + bob.cwd + `","hook_event_name":"PreToolUse","tool_name":"Bash"}`
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if r := bob.runIn(ctx, ev, "hook"); r.code != 0 || r.stdout != "" {
		t.Fatalf("hook: %+v", r)
	}
	testkit.Eventually(t, 10*time.Second, "bob working by hook", func() bool {
		for _, p := range decode[[]map[string]any](t, alice.ok("peers", "--json")) {
			if p["displayName"] == "bob" && p["status"] == "working" && p["statusSource"] == "hook" {
				return true
			}
		}
		return false
	})
	session.stop(t)

	// Unread messages are announced on UserPromptSubmit (stdout becomes
	// context for Claude), not on other events.
	alice.ok("send", "bob", "review my PR")
	bob.ok("inbox", "--peek")
	prompt := `{"session_id":"cc-1","cwd":"` + bob.cwd + `","hook_event_name":"UserPromptSubmit","prompt":"hi"}`
	r := bob.runIn(ctx, prompt, "hook")
	if r.code != 0 || !strings.Contains(r.stdout, "1 in mesh team (from alice ("+f.alicePubkey[:8]+"))") || !strings.Contains(r.stdout, "check_messages") {
		t.Fatalf("hook on prompt: %+v", r)
	}
	if r := bob.runIn(ctx, `{"hook_event_name":"Stop","cwd":"`+bob.cwd+`"}`, "hook"); r.code != 0 || r.stdout != "" {
		t.Fatalf("hook on stop: %+v", r)
	}
	// Garbage on stdin never fails the hook.
	if r := bob.runIn(ctx, "garbage", "hook"); r.code != 0 || !strings.Contains(r.stderr, "hook input") {
		t.Fatalf("hook on garbage: %+v", r)
	}
	// Not joined: silent.
	if r := newUser(t, "eve").runIn(ctx, prompt, "hook"); r.code != 0 || r.stdout != "" || r.stderr != "" {
		t.Fatalf("hook when not joined: %+v", r)
	}
}

func TestInstall(t *testing.T) {
	u := newUser(t, "frank")
	settings := filepath.Join(u.home, ".claude", "settings.json")
	if err := os.MkdirAll(filepath.Dir(settings), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(settings, []byte(`{"theme":"dark","hooks":{"Stop":[{"hooks":[{"type":"command","command":"say done"}]}]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	printed := decode[map[string]any](t, u.ok("install", "--print", "--json"))
	if printed["claudeMcpAdd"] != "claude mcp add --scope user claudemesh -- /usr/local/bin/claudemesh mcp" {
		t.Fatalf("print: %v", printed)
	}
	if data, _ := os.ReadFile(settings); strings.Contains(string(data), "claudemesh") {
		t.Fatal("--print wrote the settings")
	}
	out := u.ok("install")
	if !strings.Contains(out, "previous version saved as") {
		t.Fatalf("install: %s", out)
	}
	var s struct {
		Theme string
		Hooks map[string][]struct {
			Hooks []struct{ Command string }
		}
	}
	data, _ := os.ReadFile(settings)
	_ = json.Unmarshal(data, &s)
	if s.Theme != "dark" || len(s.Hooks["Stop"]) != 2 || s.Hooks["Stop"][1].Hooks[0].Command != "/usr/local/bin/claudemesh hook" ||
		len(s.Hooks["SessionStart"]) != 1 {
		t.Fatalf("settings: %s", data)
	}
	var cj struct {
		McpServers map[string]struct {
			Command string
			Args    []string
		}
	}
	data, _ = os.ReadFile(filepath.Join(u.home, ".claude.json"))
	_ = json.Unmarshal(data, &cj)
	if cj.McpServers["claudemesh"].Command != "/usr/local/bin/claudemesh" || cj.McpServers["claudemesh"].Args[0] != "mcp" {
		t.Fatalf(".claude.json: %s", data)
	}
	// Idempotent.
	if out := u.ok("install"); strings.Contains(out, "added") || strings.Contains(out, "backup") {
		t.Fatalf("second install changed something: %s", out)
	}
}

func TestHelpAndUsage(t *testing.T) {
	u := newUser(t, "gina")
	for _, cmd := range []string{"keygen", "join", "meshes", "send", "inbox", "listen", "peers", "members", "status", "summary", "outbox", "hook", "install", "uninstall", "mcp"} {
		r := u.run(cmd, "--help")
		if r.code != 0 || !strings.Contains(r.stdout, "Usage: claudemesh "+cmd) {
			t.Errorf("%s --help: %d %q", cmd, r.code, r.stdout)
		}
	}
	if r := u.run("status", "sleeping"); r.code != 2 || !strings.Contains(r.stderr, "must be one of") {
		t.Errorf("bad status: %+v", r)
	}
	if r := u.run("frobnicate"); r.code != 2 {
		t.Errorf("unknown command: %+v", r)
	}
}

// `claudemesh mcp` serves the MCP tools on its stdin/stdout: driven here by
// the SDK's client over pipes, as Claude Code drives it.
func TestMCPCommand(t *testing.T) {
	f := setup(t)
	alice, bob := f.alice, f.bob
	listen := bob.start("listen", "--no-events")

	inR, inW := io.Pipe()   // client → server
	outR, outW := io.Pipe() // server → client
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan result, 1)
	go func() {
		var errb bytes.Buffer
		env := alice.env("", nil, &errb)
		env.Stdin, env.Stdout = inR, outW
		code := cli.Run(ctx, []string{"mcp", "--infer", "never", "--group", "reviewers"}, env)
		outW.Close()
		done <- result{code: code, stderr: errb.String()}
	}()
	c := mcp.NewClient(&mcp.Implementation{Name: "claude-code-test", Version: "v0"}, nil)
	cs, err := c.Connect(ctx, &mcp.IOTransport{Reader: outR, Writer: inW}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(cs.InitializeResult().Instructions, `"alice"`) {
		t.Errorf("instructions: %q", cs.InitializeResult().Instructions)
	}
	testkit.Eventually(t, 10*time.Second, "bob listed", func() bool {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "list_peers"})
		return err == nil && !res.IsError && strings.Contains(res.Content[0].(*mcp.TextContent).Text, "bob")
	})
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "send_message", Arguments: map[string]any{"to": "bob", "message": "from claude"}})
	if err != nil || res.IsError {
		t.Fatalf("send_message: %v %+v", err, res)
	}
	// alice's MCP session is in @reviewers: a group message reaches it.
	bob.ok("send", "@reviewers", "please review #12")
	testkit.Eventually(t, 10*time.Second, "group message checked", func() bool {
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: "check_messages"})
		return err == nil && !res.IsError && strings.Contains(res.Content[0].(*mcp.TextContent).Text, "please review #12")
	})
	// The MCP session registered for `claudemesh status` in alice's folder.
	alice.ok("status", "working")
	testkit.Eventually(t, 10*time.Second, "alice working", func() bool {
		for _, p := range decode[[]map[string]any](t, bob.ok("peers", "--json")) {
			if p["displayName"] == "alice" && p["status"] == "working" && p["statusSource"] == "manual" {
				return true
			}
		}
		return false
	})
	// Closing stdin ends the server cleanly.
	cs.Close()
	inW.Close()
	select {
	case r := <-done:
		if r.code != 0 {
			t.Fatalf("mcp exited %d: %s", r.code, r.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("mcp did not exit when stdin closed")
	}
	// send_message returns on the broker's ack, before bob's listener has
	// written the push to his inbox: wait for the write, then stop it.
	testkit.Eventually(t, 10*time.Second, "bob's listener stored it", func() bool {
		return len(decode[[]client.Message](t, bob.ok("inbox", "--all", "--offline", "--json"))) > 0
	})
	listen.stop(t)
	msgs := decode[[]client.Message](t, bob.ok("inbox", "--all", "--offline", "--json"))
	if len(msgs) != 1 || msgs[0].Text != "from claude" {
		t.Fatalf("bob got %+v", msgs)
	}
}
