package devcluster_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/cli"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/devcluster"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// person runs claudemesh commands in their own scratch HOME, through the
// same code as the claudemesh binary (cli.Run).
type person struct {
	t    *testing.T
	home string
}

func newPerson(t *testing.T) *person { return &person{t: t, home: t.TempDir()} }

func (p *person) run(args ...string) (int, string, string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := cli.Run(ctx, args, cli.Env{
		Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errb,
		Getenv: func(string) string { return "" }, Home: p.home, Cwd: p.home, Hostname: "testhost",
		Executable: "/usr/local/bin/claudemesh", SessionPID: func() (int, bool) { return 0, false },
	})
	return code, out.String(), errb.String()
}

func (p *person) ok(args ...string) string {
	p.t.Helper()
	code, out, errOut := p.run(args...)
	if code != 0 {
		p.t.Fatalf("claudemesh %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// line runs a command line exactly as printed by the banner.
func (p *person) line(l string) string {
	p.t.Helper()
	f := strings.Fields(l)
	if len(f) < 2 || f[0] != "claudemesh" {
		p.t.Fatalf("not a claudemesh command: %q", l)
	}
	return p.ok(f[1:]...)
}

func (p *person) pubkey() string {
	p.t.Helper()
	var meshes []map[string]any
	if err := json.Unmarshal([]byte(p.ok("meshes", "--json")), &meshes); err != nil || len(meshes) != 1 {
		p.t.Fatalf("meshes: %v %v", meshes, err)
	}
	return meshes[0]["pubkey"].(string)
}

// banner is what one start of the dev cluster printed.
type banner struct {
	text     string
	joins    map[string]string // name -> join line
	postgres string            // the Postgres line
}

var joinLine = regexp.MustCompile(`(?m)^  (claudemesh join cm1\.\S+ --name (\S+))$`)

func parseBanner(t *testing.T, text string) banner {
	t.Helper()
	b := banner{text: text, joins: map[string]string{}}
	for _, m := range joinLine.FindAllStringSubmatch(text, -1) {
		b.joins[m[2]] = m[1]
	}
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "Postgres: ") {
			b.postgres = l
		}
	}
	if len(b.joins) != 2 || b.joins["alice"] == "" || b.joins["bob"] == "" || b.postgres == "" {
		t.Fatalf("the banner lacks a join line per demo member or the Postgres line:\n%s", text)
	}
	// Secret keys and protocol-author instructions only with --keys.
	for _, never := range []string{"secretKey", "signed", "memberId"} {
		if strings.Contains(text, never) {
			t.Fatalf("the default banner shows %q:\n%s", never, text)
		}
	}
	return b
}

// reachableTempDir is a temporary folder the postgres user can enter when
// the tests run as root.
func reachableTempDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// The banner's join lines work as printed, and keep working across
// restarts of the same --data: a private Postgres on the same port, the
// same mesh, the same invite, the same members. A second `broker dev` on
// the folder is refused while the first runs; a changed balancer port
// re-issues the invite, saying why.
func TestBannerJoinLinesSurviveRestart(t *testing.T) {
	data := reachableTempDir(t)
	ports := freePorts(t, 5) // 2 HTTP, 2 gossip, 1 LB
	start := func(lbPort int) (*devcluster.Cluster, banner) {
		t.Helper()
		base := &config.Config{} // no DATABASE_URL: the private Postgres
		base.Normalize()
		var out bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := devcluster.Start(ctx, devcluster.Options{
			Nodes: 2, DataDir: data, BasePort: ports, GossipPort: ports + 2, LBPort: lbPort,
			Base: base, Logger: testkit.Logger(t), Out: &out,
		})
		if err != nil {
			t.Fatalf("start: %v\n%s", err, out.String())
		}
		t.Cleanup(func() { _ = c.Stop(context.Background()) })
		return c, parseBanner(t, out.String())
	}

	c1, b1 := start(ports + 4)
	lbURL := "ws://127.0.0.1:" + strconv.Itoa(ports+4) + "/ws"
	if c1.PublicURL != lbURL || !strings.Contains(b1.text, "The invite points at "+lbURL) {
		t.Fatalf("public URL %s, want the balancer's %s", c1.PublicURL, lbURL)
	}
	if !strings.Contains(b1.postgres, "the same port every time for this --data") {
		t.Fatalf("Postgres line: %s", b1.postgres)
	}
	if _, err := devcluster.Start(context.Background(), devcluster.Options{DataDir: data, Out: &bytes.Buffer{}}); err == nil ||
		!strings.Contains(err.Error(), "another broker dev (PID "+strconv.Itoa(os.Getpid())+") is using --data") {
		t.Fatalf("a second dev cluster on the same --data: %v", err)
	}

	alice, bob := newPerson(t), newPerson(t)
	if out := alice.line(b1.joins["alice"]); !strings.Contains(out, `joined mesh "demo"`) || !strings.Contains(out, `as alice (`) {
		t.Fatalf("alice's join: %s", out)
	}
	if out := bob.line(b1.joins["bob"]); !strings.Contains(out, `as bob (`) {
		t.Fatalf("bob's join: %s", out)
	}
	send := func(text string) {
		t.Helper()
		alice.ok("send", bob.pubkey(), text)
		var msgs []client.Message
		if err := json.Unmarshal([]byte(bob.ok("inbox", "--json")), &msgs); err != nil || len(msgs) != 1 || msgs[0].Text != text {
			t.Fatalf("bob's inbox: %+v %v; want %q", msgs, err, text)
		}
	}
	send("before the restart")

	if err := c1.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	c2, b2 := start(ports + 4)
	if b2.joins["alice"] != b1.joins["alice"] || b2.joins["bob"] != b1.joins["bob"] {
		t.Fatalf("the join lines changed across a restart:\n%s\n%s", b1.text, b2.text)
	}
	if b2.postgres != b1.postgres || c2.PG.Port() != c1.PG.Port() || c2.Demo.MeshID != c1.Demo.MeshID {
		t.Fatalf("restart: %q (mesh %s) after %q (mesh %s)", b2.postgres, c2.Demo.MeshID, b1.postgres, c1.Demo.MeshID)
	}
	if strings.Contains(b2.text, "new demo invite") {
		t.Fatalf("the invite was re-issued:\n%s", b2.text)
	}
	// The same lines again: alice is recognised, a newcomer joins.
	if out := alice.line(b2.joins["alice"]); !strings.Contains(out, "already a member") {
		t.Fatalf("alice's second join: %s", out)
	}
	if out := newPerson(t).line(strings.Replace(b2.joins["bob"], "--name bob", "--name erin", 1)); !strings.Contains(out, `as erin (`) {
		t.Fatalf("a newcomer's join after the restart: %s", out)
	}
	send("after the restart")

	// Another balancer port: the old invite points at the wrong place.
	if err := c2.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	moved := freePorts(t, 1)
	c3, b3 := start(moved)
	if b3.joins["alice"] == b1.joins["alice"] || c3.Demo.MeshID != c1.Demo.MeshID ||
		!strings.Contains(b3.text, "a new demo invite: the cluster's URL changed from "+lbURL) {
		t.Fatalf("after moving the balancer:\n%s", b3.text)
	}
	carol := newPerson(t)
	carol.line(strings.Replace(b3.joins["bob"], "--name bob", "--name carol", 1))
	var meshes []map[string]any
	if err := json.Unmarshal([]byte(carol.ok("meshes", "--json")), &meshes); err != nil ||
		meshes[0]["brokerUrls"].([]any)[0] != "ws://127.0.0.1:"+strconv.Itoa(moved)+"/ws" {
		t.Fatalf("carol's mesh: %v %v", meshes, err)
	}
}

// A data folder from an older broker dev holds a demo mesh whose members,
// alice and bob, were enrolled with keys the claudemesh CLI cannot use: it
// is replaced (saying so), so that the join lines' alice and bob are the
// mesh's only alice and bob.
func TestOldDemoMeshReplaced(t *testing.T) {
	db := pgtest.NewDB(t)
	ctx := context.Background()
	st, err := store.Open(ctx, db, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	old, err := admin.CreateMesh(ctx, st, "demo", "")
	if err != nil {
		t.Fatal(err)
	}
	var members []map[string]string
	for _, name := range []string{"alice", "bob"} {
		pub, priv, _ := ed25519.GenerateKey(nil)
		m, err := admin.AddMember(ctx, st, old.MeshID, hex.EncodeToString(pub), name, "member")
		if err != nil {
			t.Fatal(err)
		}
		members = append(members, map[string]string{"name": name, "memberId": m.ID, "pubkey": m.Pubkey, "secretKey": hex.EncodeToString(priv)})
	}
	data := t.TempDir()
	v1, _ := json.Marshal(map[string]any{"meshId": old.MeshID, "slug": old.Slug, "ownerPubkey": old.OwnerPubkey,
		"ownerSecretKey": old.OwnerSecretKey, "members": members})
	if err := os.WriteFile(filepath.Join(data, "demo.json"), v1, 0o600); err != nil {
		t.Fatal(err)
	}

	base := &config.Config{DatabaseURL: db}
	base.Normalize()
	ports := freePorts(t, 2)
	var out bytes.Buffer
	c, err := devcluster.Start(ctx, devcluster.Options{Nodes: 1, DataDir: data, BasePort: ports, GossipPort: ports + 1,
		Base: base, Logger: testkit.Logger(t), Out: &out})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	b := parseBanner(t, out.String())
	if !strings.Contains(b.text, "the demo mesh of an older broker dev") || c.Demo.MeshID == old.MeshID || c.Demo.Slug != "demo" {
		t.Fatalf("mesh %s (%s) after the old %s:\n%s", c.Demo.MeshID, c.Demo.Slug, old.MeshID, b.text)
	}
	if _, err := st.GetMesh(ctx, old.MeshID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the old demo mesh: %v", err)
	}
	if ms, err := st.MeshMembers(ctx, c.Demo.MeshID); err != nil || len(ms) != 0 {
		t.Fatalf("members of the new demo mesh before anyone joined: %+v %v", ms, err)
	}
	if !strings.Contains(b.postgres, "(DATABASE_URL)") {
		t.Fatalf("Postgres line: %s", b.postgres)
	}
}
