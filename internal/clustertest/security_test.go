package clustertest_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/testkit"
)

// maximalEphemeral is a one-shot command's hello with every optional field
// at its protocol limit, in characters JSON escapes (<, > and & took six
// bytes each with encoding/json's default HTML escaping).
func maximalEphemeral(i int) client.HelloOptions {
	pad := func(prefix, pattern string, n int) string {
		return (prefix + strings.Repeat(pattern, n/len(pattern)+1))[:n]
	}
	groups := make([]string, protocol.MaxGroups)
	for g := range groups {
		groups[g] = pad(fmt.Sprintf("g%02d", g), "<&>", protocol.MaxGroupNameLen)
	}
	return client.HelloOptions{
		SessionID: pad(fmt.Sprintf("cli-%06d-", i), "<&>", protocol.MaxIDLen), PID: int64(i),
		Cwd: pad("/w/", "<&>", protocol.MaxCwdLen), Hostname: pad("h", "<&>", protocol.MaxHostnameLen),
		Groups: groups, Capabilities: []string{protocol.CapEphemeral},
	}
}

// talk sends a message from one honest session to another and waits for
// it: honest traffic while an attack runs.
func talk(t *testing.T, from, to *client.Conn, toID client.Identity, body string) {
	t.Helper()
	ack := sendAck(t, from, protocol.Send{TargetSpec: toID.Pubkey(), Ciphertext: body})
	if p := testkit.ExpectPush(t, to, 10*time.Second); p.MessageID != ack.MessageID || p.Ciphertext != body {
		t.Fatalf("honest message %q: got %s %q, want %s", body, p.MessageID, p.Ciphertext, ack.MessageID)
	}
}

// One member runs 1,000 connect/close cycles of ephemeral sessions with
// maximal groups, cwd, hostname and session id, while two honest members
// on two nodes keep messaging. A node started afterwards joins the cluster
// and lists the honest peers within 10 s: the churn left no presence state
// behind that could push a node's gossip state past memberlist's limit (it
// used to leave 33 KB grace entries, then ten minutes of tombstones with
// every field, and no node could join).
func TestJoinAfterEphemeralChurn(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	a, b := nodes[0], nodes[1]
	mesh := testkit.NewMesh(t, a.Store(), 4)
	attacker, h0, h1, late := mesh.Members[0], mesh.Members[1], mesh.Members[2], mesh.Members[3]
	c0 := testkit.Connect(t, a.URL(), h0, client.HelloOptions{})
	c1 := testkit.Connect(t, b.URL(), h1, client.HelloOptions{})

	const cycles, workers = 1000, 4
	// Distinct timestamps: two hellos of one member in the same
	// millisecond have the same signature (the second is a replay). Each
	// is the time of its own hello, or a millisecond after the last one
	// taken: the churn may take longer than the hello window (under the
	// race detector on two cores it took over 30 s).
	var stampMu sync.Mutex
	var lastStamp int64
	stamp := func() time.Time {
		stampMu.Lock()
		defer stampMu.Unlock()
		lastStamp = max(time.Now().UnixMilli(), lastStamp+1)
		return time.UnixMilli(lastStamp)
	}
	var done, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < cycles; i += workers {
				o := maximalEphemeral(i)
				o.Timestamp = stamp()
				if err := oneShot(a.URL(), attacker, o); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
				done.Add(1)
			}
		})
	}
	for round := 0; done.Load() < cycles; round++ {
		talk(t, c0, c1, h1, fmt.Sprintf("during-%d", round))
		talk(t, c1, c0, h0, fmt.Sprintf("back-%d", round))
		if round > 100_000 {
			t.Fatal("the churn does not finish")
		}
	}
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d cycles failed, first: %v", failed.Load(), cycles, firstErr.Load())
	}
	talk(t, c0, c1, h1, "after")

	start := time.Now()
	c := testkit.StartNode(t, db, testkit.Options{Join: nodes[:1], Configure: func(c *config.Config) {
		c.Host, c.ClusterBind = "127.0.0.13", "127.0.0.13:0"
	}})
	cc := testkit.Connect(t, c.URL(), late, client.HelloOptions{})
	want := map[string]bool{}
	for _, e := range append(a.Replica().Live(mesh.MeshID), b.Replica().Live(mesh.MeshID)...) {
		if e.MemberID == h0.MemberID || e.MemberID == h1.MemberID {
			want[e.PresenceID] = true
		}
	}
	if len(want) != 2 {
		t.Fatalf("%d honest sessions live, want 2", len(want))
	}
	testkit.Eventually(t, 10*time.Second-time.Since(start), "the new node joined and lists the honest peers", func() bool {
		if c.Cluster().NumMembers() != 3 {
			return false
		}
		testkit.Write(t, cc, protocol.ListPeers{Type: protocol.TypeListPeers})
		var pl protocol.PeersList
		if err := testkit.Expect(t, cc, protocol.TypePeersList, 5*time.Second).Decode(&pl); err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, p := range pl.Peers {
			if want[p.PresenceID] {
				seen++
			}
		}
		return seen == 2
	})
	t.Logf("joined and listed the mesh %s after start; gossip state of A %v bytes, presence entries on A %d",
		time.Since(start).Round(time.Millisecond), a.Counter("broker_gossip_state_bytes"), a.Replica().Len())
	talk(t, cc, c0, h0, "from-the-new-node")
	if s := a.Counter("broker_gossip_state_bytes"); s > 64<<10 {
		t.Fatalf("A's push-pull state is %v bytes after the churn", s)
	}
}

// oneShot connects a session, waits for its hello_ack and closes it, as a
// CLI command does.
func oneShot(url string, id client.Identity, o client.HelloOptions) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	if _, err := c.Hello(ctx, id, o); err != nil {
		return err
	}
	return c.Close()
}

// rogue is a memberlist node that is not part of the cluster (it does not
// have the key, when there is one).
func rogue(t *testing.T, ip string) *memberlist.Memberlist {
	t.Helper()
	cfg := memberlist.DefaultLocalConfig()
	cfg.Name, cfg.BindAddr, cfg.BindPort, cfg.AdvertisePort = "rogue", ip, 0, 0
	cfg.Logger = log.New(io.Discard, "", 0)
	ml, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	return ml
}

// nodeOf is the memberlist address of a test node.
func nodeOf(t *testing.T, n *testkit.Node) *memberlist.Node {
	t.Helper()
	host, port, err := net.SplitHostPort(n.GossipAddr())
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	return &memberlist.Node{Name: n.Name(), Addr: net.ParseIP(host), Port: uint16(p)}
}

// forgedGossip is what a rogue node sends: an entry for a fake peer in the
// victim's mesh (claimed for node owner) and a hook command setting the
// victim's status.
func forgedGossip(mesh, member, owner, victimPresence string) (delta, cmd []byte) {
	delta = []byte(fmt.Sprintf(`D{"f":%q,"e":[{"id":"fake-peer","o":%q,"oi":1,"e":1,"v":1,"m":%q,"mb":%q,"pk":"%s","dn":"fake","s":"x","st":"idle","ss":"jsonl","x":0}]}`,
		owner, owner, mesh, member, strings.Repeat("ab", 32)))
	cmd = []byte(fmt.Sprintf(`C{"k":"hook","p":%q,"s":"dnd","f":%q}`, victimPresence, owner))
	return delta, cmd
}

// With CLUSTER_SECRET, a memberlist node without the key can neither join
// nor inject: its push-pull, its forged entry for a fake peer and its
// forged hook command are refused (and counted) by memberlist, while the
// honest nodes' gossip keeps flowing.
func TestRogueGossipNodeWithoutTheKey(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{Configure: func(c *config.Config) {
		c.ClusterSecret = "a cluster secret for this test"
	}})
	a, b := nodes[0], nodes[1]
	mesh := testkit.NewMesh(t, a.Store(), 2)
	victim := testkit.Connect(t, a.URL(), mesh.Members[0], client.HelloOptions{})
	peer := testkit.Connect(t, b.URL(), mesh.Members[1], client.HelloOptions{})
	var victimPresence string
	testkit.Eventually(t, 5*time.Second, "B sees the victim", func() bool {
		for _, e := range b.Replica().Live(mesh.MeshID) {
			if e.MemberID == mesh.Members[0].MemberID {
				victimPresence = e.PresenceID
				return true
			}
		}
		return false
	})

	r := rogue(t, "127.0.0.20")
	if _, err := r.Join([]string{a.GossipAddr()}); err == nil {
		t.Fatal("a node without the key joined the cluster")
	}
	delta, cmd := forgedGossip(mesh.MeshID, mesh.Members[1].MemberID, a.Name(), victimPresence)
	for _, m := range [][]byte{delta, cmd} {
		if err := r.SendReliable(nodeOf(t, a), m); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 10*time.Second, "A refused the rogue's join and messages", func() bool {
		return a.Counter("broker_gossip_refused_total") >= 3
	})
	// Honest gossip still flows, both ways.
	testkit.Write(t, peer, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: "honest"})
	testkit.Write(t, victim, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	testkit.Eventually(t, 5*time.Second, "honest changes replicated", func() bool {
		var summary, status bool
		for _, e := range a.Replica().Live(mesh.MeshID) {
			summary = summary || (e.MemberID == mesh.Members[1].MemberID && e.Summary == "honest")
		}
		for _, e := range b.Replica().Live(mesh.MeshID) {
			status = status || (e.PresenceID == victimPresence && e.Status == protocol.StatusWorking)
		}
		return summary && status
	})
	if _, ok := a.Replica().Get("fake-peer"); ok {
		t.Fatal("the rogue injected a peer")
	}
	if e, _ := a.Replica().Get(victimPresence); e.Status != protocol.StatusWorking || e.StatusSource != protocol.SourceManual {
		t.Fatalf("the victim's status is %s (%s), want working (manual)", e.Status, e.StatusSource)
	}
	talk(t, victim, peer, mesh.Members[1], "still-talking")
	t.Logf("refused: %v streams/packets on A", a.Counter("broker_gossip_refused_total"))
}

// Without a key (CLUSTER_INSECURE, a lab), a node that joins still speaks
// only for itself: an entry it sends for another node's session is
// dropped, and a hook command is run only by the node owning the presence.
func TestGossipNodeSpeaksOnlyForItself(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	a, b := nodes[0], nodes[1]
	mesh := testkit.NewMesh(t, a.Store(), 2)
	victim := testkit.Connect(t, a.URL(), mesh.Members[0], client.HelloOptions{})
	peer := testkit.Connect(t, b.URL(), mesh.Members[1], client.HelloOptions{})
	var victimPresence string
	testkit.Eventually(t, 5*time.Second, "B sees the victim", func() bool {
		for _, e := range b.Replica().Live(mesh.MeshID) {
			if e.MemberID == mesh.Members[0].MemberID {
				victimPresence = e.PresenceID
				return true
			}
		}
		return false
	})
	r := rogue(t, "127.0.0.21")
	if _, err := r.Join([]string{a.GossipAddr()}); err != nil {
		t.Fatalf("join without a key: %v", err)
	}
	// An entry claimed for A, sent by the rogue under its own name, and a
	// hook command for A's session sent to B.
	delta, _ := forgedGossip(mesh.MeshID, mesh.Members[1].MemberID, a.Name(), victimPresence)
	delta = []byte(strings.Replace(string(delta), `"f":"`+a.Name()+`"`, `"f":"rogue"`, 1))
	_, cmd := forgedGossip(mesh.MeshID, mesh.Members[1].MemberID, "rogue", victimPresence)
	if err := r.SendReliable(nodeOf(t, b), delta); err != nil {
		t.Fatal(err)
	}
	if err := r.SendReliable(nodeOf(t, b), cmd); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "B dropped the rogue's entry and command", func() bool {
		return b.Counter("broker_gossip_entries_dropped_total", "reason", "not_owner") >= 1 &&
			b.Counter("broker_gossip_commands_dropped_total") >= 1
	})
	testkit.Write(t, peer, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: "honest"})
	testkit.Eventually(t, 5*time.Second, "honest change replicated", func() bool {
		for _, e := range a.Replica().Live(mesh.MeshID) {
			if e.MemberID == mesh.Members[1].MemberID && e.Summary == "honest" {
				return true
			}
		}
		return false
	})
	if _, ok := b.Replica().Get("fake-peer"); ok {
		t.Fatal("B stored an entry the rogue sent for A")
	}
	if e, _ := a.Replica().Get(victimPresence); e.Status != protocol.StatusIdle {
		t.Fatalf("the victim's status changed to %s", e.Status)
	}
	talk(t, peer, victim, mesh.Members[0], "still-talking")
}

// Any database role may NOTIFY on a node's envelope channel (and LISTEN to
// it). Forged envelopes (an invented seal, a captured envelope with its
// text or message id changed, the unsealed format of earlier versions) and
// a replayed genuine one push nothing; honest envelopes keep flowing on
// the remote fast path.
func TestForgedEnvelopeNotifications(t *testing.T) {
	db := pgtest.NewDB(t)
	nodes := testkit.StartCluster(t, db, 2, testkit.Options{})
	a, b := nodes[0], nodes[1]
	listening(t, b)
	mesh := testkit.NewMesh(t, a.Store(), 2)
	sender := testkit.Connect(t, a.URL(), mesh.Members[0], client.HelloOptions{})
	rcpt := testkit.Connect(t, b.URL(), mesh.Members[1], client.HelloOptions{})
	var lease struct{ node, presence, conn string }
	testkit.Eventually(t, 5*time.Second, "A sees the recipient's only session live on B", func() bool {
		e, ok := a.Replica().SoleRemoteSession(mesh.Members[1].MemberID)
		lease.node, lease.presence, lease.conn = e.Owner+"#"+strconv.FormatInt(e.OwnerInc, 10), e.PresenceID, e.ConnID
		return ok
	})
	other := testkit.OtherRole(t, db)
	ctx := context.Background()
	if _, err := other.Exec(ctx, "SELECT key FROM relay_key"); err == nil {
		t.Fatal("another database role can read the relay key")
	}
	channel := relay.NodeChannel(b.Name())
	if _, err := other.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		t.Fatal(err)
	}

	// An honest message on the fast path; the other role captures its
	// envelope.
	first := sendAck(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "honest-1"})
	if p := testkit.ExpectPush(t, rcpt, 10*time.Second); p.MessageID != first.MessageID || p.Ciphertext != "honest-1" {
		t.Fatalf("first push %+v", p)
	}
	var captured string
	for captured == "" {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := other.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("no envelope seen on %s: %v", channel, err)
		}
		if relay.IsEnvelope(n.Payload) {
			captured = n.Payload
		}
	}
	line, body, _ := strings.Cut(captured, "\n")
	f := strings.Fields(line)
	if len(f) != 5 || f[2] != first.MessageID {
		t.Fatalf("captured %q", captured)
	}
	now := strconv.FormatInt(time.Now().UnixMicro(), 10)
	forgedBody := strings.Replace(body, `"ct":"honest-1"`, `"ct":"forged"`, 1)
	forged := map[string]string{
		"invented seal": fmt.Sprintf("e2 %s 999999999 %s %s\n%s", now, now, strings.Repeat("0", 64), forgedBody),
		"text changed":  line + "\n" + forgedBody,
		"id changed":    strings.Replace(line, " "+first.MessageID+" ", " 999999998 ", 1) + "\n" + body,
		"unsealed e1":   fmt.Sprintf("e1 %s 999999997 %s\n%s", now, now, forgedBody),
	}
	if !strings.Contains(forgedBody, `"ct":"forged"`) || !strings.Contains(body, lease.conn) {
		t.Fatalf("unexpected envelope body %s (lease %+v)", body, lease)
	}
	for name, p := range forged {
		if _, err := other.Exec(ctx, "SELECT pg_notify($1, $2)", channel, p); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		talk(t, sender, rcpt, mesh.Members[1], "during-"+strings.ReplaceAll(name, " ", "-"))
	}
	if _, err := other.Exec(ctx, "SELECT pg_notify($1, $2)", channel, captured); err != nil { // a replay
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "the forged envelopes refused", func() bool {
		return b.Counter("broker_relay_rejected_total", "reason", "bad_seal") >= 3 &&
			b.Counter("broker_relay_rejected_total", "reason", "malformed") >= 1
	})
	// Every notification above was handled before this message's: the
	// next push is it, with nothing forged or repeated before it.
	last := sendAck(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "honest-last"})
	if p := testkit.ExpectPush(t, rcpt, 10*time.Second); p.MessageID != last.MessageID || p.Ciphertext != "honest-last" {
		t.Fatalf("pushed %s %q, want %s honest-last", p.MessageID, p.Ciphertext, last.MessageID)
	}
	if extra := drain(t, rcpt, 300*time.Millisecond); len(extra) != 0 {
		t.Fatalf("%d unexpected pushes, first %+v", len(extra), extra[0])
	}
	if b.Counter("broker_delivery_claims_total", "reason", "relayed") < 1 {
		t.Fatal("no honest row took the remote fast path")
	}
}

// `broker serve` refuses to gossip beyond loopback without CLUSTER_SECRET,
// naming it, before touching anything else; CLUSTER_INSECURE=true lets a
// private lab run that way.
func TestServeRefusesOpenGossipWithoutSecret(t *testing.T) {
	bin := brokerBinary(t)
	var base []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CLUSTER_") && !strings.HasPrefix(kv, "DATABASE_URL=") && !strings.HasPrefix(kv, "BROKER_") {
			base = append(base, kv)
		}
	}
	run := func(env ...string) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "serve")
		cmd.Env = append(append([]string(nil), base...), env...)
		out, err := cmd.CombinedOutput()
		if ctx.Err() != nil {
			t.Fatalf("broker serve %v did not exit: %s", env, out)
		}
		return string(out), exitCode(err)
	}
	for _, bind := range []string{"0.0.0.0:0", ""} {
		env := []string{"DATABASE_URL=postgres://127.0.0.1:1/unreachable", "BROKER_HOST=127.0.0.1", "BROKER_PORT=0"}
		if bind != "" {
			env = append(env, "CLUSTER_BIND="+bind)
		}
		out, code := run(env...)
		if code == 0 || !strings.Contains(out, "CLUSTER_SECRET") {
			t.Fatalf("CLUSTER_BIND=%q without a secret: exit %d, output:\n%s", bind, code, out)
		}
	}

	// The override: it starts, serves and stops cleanly.
	db := pgtest.NewDB(t)
	port := freePort(t, "127.0.0.1")
	cmd := exec.Command(bin, "serve")
	cmd.Env = append(append([]string(nil), base...), "DATABASE_URL="+db, "BROKER_HOST=127.0.0.1",
		"BROKER_PORT="+strconv.Itoa(port), "CLUSTER_BIND=0.0.0.0:0", "CLUSTER_INSECURE=true", "NODE_NAME=insecure-lab")
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	testkit.Eventually(t, 30*time.Second, "the insecure lab node healthy", func() bool {
		h, err := getHealth(fmt.Sprintf("http://127.0.0.1:%d", port))
		return err == nil && h.Status == "ok"
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if code := exitCode(err); code != 0 {
			t.Fatalf("exit %d after SIGTERM:\n%s", code, logs.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	if !strings.Contains(logs.String(), "CLUSTER_INSECURE") {
		t.Fatalf("no warning about unauthenticated gossip:\n%s", logs.String())
	}
}
