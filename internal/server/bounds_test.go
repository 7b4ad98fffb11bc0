package server_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// fill repeats pattern to exactly n bytes (pattern is ASCII).
func fill(prefix, pattern string, n int) string {
	s := prefix + strings.Repeat(pattern, n/len(pattern)+1)
	return s[:n]
}

// maximalHello has every optional hello field at its protocol limit, made
// of characters JSON escapes (" and \ take two bytes, and <, >, & took six
// with encoding/json's default HTML escaping).
func maximalHello(i int) client.HelloOptions {
	tag := fmt.Sprintf("%04d", i)
	groups := make([]string, protocol.MaxGroups)
	for g := range groups {
		groups[g] = fill(fmt.Sprintf("g%02d", g), `<&>"\`, protocol.MaxGroupNameLen)
	}
	return client.HelloOptions{
		SessionID: fill("s"+tag, `<"&\>`, protocol.MaxIDLen),
		PID:       int64(1000 + i),
		Cwd:       fill("/home/"+tag+"/", `<">&\`, protocol.MaxCwdLen),
		Hostname:  fill("h"+tag, `<&>"`, protocol.MaxHostnameLen),
		Groups:    groups,
	}
}

var maximalSummary = fill("", `"<&>\`, protocol.MaxSummaryLen)

// connectMaximal connects a maximal session of id and sets a maximal
// summary on it.
func connectMaximal(t *testing.T, url string, id client.Identity, i int) *client.Conn {
	t.Helper()
	c := testkit.Connect(t, url, id, maximalHello(i))
	testkit.Write(t, c, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: maximalSummary})
	return c
}

// exchange sends n messages from one honest session to another and checks
// each arrives: honest traffic while an attack runs.
func exchange(t *testing.T, from, to *client.Conn, toID client.Identity, n int, tag string) {
	t.Helper()
	for i := range n {
		body := fmt.Sprintf("%s-%d", tag, i)
		ack := testkit.Send(t, from, protocol.Send{TargetSpec: toID.Pubkey(), Ciphertext: body})
		if !ack.Queued {
			t.Fatalf("honest send %s: %+v", body, ack)
		}
		if p := testkit.ExpectPush(t, to, 10*time.Second); p.MessageID != ack.MessageID || p.Ciphertext != body {
			t.Fatalf("honest push %s: got %s %q", body, p.MessageID, p.Ciphertext)
		}
	}
}

// A mesh filled to MAX_CONNECTIONS_PER_MESH with maximal sessions: its
// peers_list fits in 1 MiB, so a client with a 1 MiB read limit (ours)
// reads it and sees every session with its identity, status and node;
// free text is shortened only as much as needed. A smaller mesh gets every
// field whole, as before. Honest messages flow throughout.
func TestPeersListOfFullMeshFitsOneMiB(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	full := n.Config.MaxConnsPerMesh
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	rcpt := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})

	// A few maximal peers: the list fits whole, nothing is shortened.
	perMember := n.Config.MaxSessionsPerMember
	var fillers []client.Identity
	for i := 0; len(fillers)*perMember < full; i++ {
		fillers = append(fillers, mesh.AddMember(t, n.Store(), fmt.Sprintf("f%d", i)))
	}
	for i := range 3 {
		connectMaximal(t, n.URL(), fillers[0], i)
	}
	testkit.Eventually(t, 5*time.Second, "three summaries set", func() bool {
		k := 0
		for _, e := range n.Replica().Live(mesh.MeshID) {
			if e.Summary == maximalSummary {
				k++
			}
		}
		return k == 3
	})
	small := listPeers(t, sender)
	for _, p := range small {
		if p.MemberID != fillers[0].MemberID {
			continue
		}
		e, ok := n.Replica().Get(p.PresenceID)
		if !ok || p.Cwd != e.Cwd || p.Summary != maximalSummary || p.Hostname != e.Hostname || len(p.Groups) != protocol.MaxGroups {
			t.Fatalf("a small mesh's peers_list shortened a peer: cwd %d/%d bytes, summary %d, hostname %d, %d groups",
				len(p.Cwd), len(e.Cwd), len(p.Summary), len(p.Hostname), len(p.Groups))
		}
	}
	if n.Counter("broker_peers_list_trimmed_total") != 0 {
		t.Fatal("a small peers_list was trimmed")
	}
	exchange(t, sender, rcpt, mesh.Members[1], 5, "before")

	// Fill the mesh to its cap (the two honest sessions count).
	for i := 3; len(n.Replica().Live(mesh.MeshID)) < full; i++ {
		connectMaximal(t, n.URL(), fillers[i/perMember], i)
		if i > 2*full {
			t.Fatal("the mesh does not fill")
		}
	}
	over := testkit.Dial(t, n.URL())
	testkit.Write(t, over, client.NewHello(fillers[len(fillers)-1], maximalHello(9999)))
	expectRejection(t, over, protocol.ReasonCapacity) // the mesh is full
	testkit.Eventually(t, 10*time.Second, "every summary set", func() bool {
		k := 0
		for _, e := range n.Replica().Live(mesh.MeshID) {
			if e.Summary == maximalSummary {
				k++
			}
		}
		return k == full-2
	})

	reader := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{Capabilities: []string{protocol.CapEphemeral}})
	testkit.Write(t, reader, protocol.ListPeers{Type: protocol.TypeListPeers, ReqID: "full"})
	f := testkit.Expect(t, reader, protocol.TypePeersList, 10*time.Second)
	if len(f.Raw) > 1<<20 {
		t.Fatalf("peers_list of %d bytes", len(f.Raw))
	}
	var pl protocol.PeersList
	if err := f.Decode(&pl); err != nil {
		t.Fatal(err)
	}
	if pl.ReqID != "full" || len(pl.Peers) != full {
		t.Fatalf("peers_list _reqId %q with %d peers, want %d", pl.ReqID, len(pl.Peers), full)
	}
	seen := map[string]bool{}
	for _, p := range pl.Peers {
		e, ok := n.Replica().Get(p.PresenceID)
		if !ok || p.Pubkey != e.Pubkey || p.MemberID != e.MemberID || p.SessionID != e.SessionID ||
			p.Status != e.Status || p.Node != n.Name() || p.DisplayName != e.DisplayName || p.ConnectedAt == "" {
			t.Fatalf("peer %s lost its identity: %+v", p.PresenceID, p)
		}
		if !strings.HasPrefix(e.Cwd, p.Cwd) || !strings.HasPrefix(e.Summary, p.Summary) {
			t.Fatalf("peer %s: free text changed, not shortened", p.PresenceID)
		}
		seen[p.PresenceID] = true
	}
	if len(seen) != full {
		t.Fatalf("%d distinct sessions listed, want %d", len(seen), full)
	}
	t.Logf("full mesh of %d maximal sessions: peers_list %d bytes", full, len(f.Raw))
	if n.Counter("broker_peers_list_trimmed_total", "how", "trimmed") < 1 {
		t.Fatal("the full mesh's peers_list was not counted as trimmed")
	}
	exchange(t, sender, rcpt, mesh.Members[1], 5, "after")
}

// rss is this process's resident set size in bytes (the node runs in it),
// or -1 when /proc does not say.
func rss() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}

// One session floods list_peers of a mesh of maximal sessions and never
// reads. Its answers are paced and bounded in bytes: it is closed as a
// slow consumer, the node's memory stays under 300 MB (the queue of 1,024
// frames of any size let it reach 1.3 GB), and honest sessions send and
// receive normally meanwhile.
func TestListPeersFloodBoundedMemory(t *testing.T) {
	const rssLimit = 300 << 20
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	sender := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	rcpt := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{})
	const peers = 40
	for i := range peers {
		if i%n.Config.MaxSessionsPerMember == 0 {
			mesh.AddMember(t, n.Store(), fmt.Sprintf("f%d", i))
		}
		connectMaximal(t, n.URL(), mesh.Members[len(mesh.Members)-1], i)
	}
	testkit.Eventually(t, 10*time.Second, "every summary set", func() bool {
		k := 0
		for _, e := range n.Replica().Live(mesh.MeshID) {
			if e.Summary == maximalSummary {
				k++
			}
		}
		return k == peers
	})
	before := rss()
	if before <= 0 {
		t.Fatal("cannot read VmRSS from /proc/self/status")
	}

	flooder := testkit.DialSilent(t, n.URL(), mesh.Members[0], client.HelloOptions{}, 0)
	var peak atomic.Int64
	peak.Store(before)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // sample the node's memory
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if r := rss(); r > peak.Load() {
				peak.Store(r)
			}
		}
	})
	var sent atomic.Int64
	wg.Go(func() { // flood until the node closes the socket (or memory runs away)
		frame := []byte(`{"type":"list_peers"}`)
		for i := 0; i < 1_000_000 && peak.Load() < rssLimit; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := flooder.Write(ctx, websocket.MessageText, frame)
			cancel()
			if err != nil {
				return
			}
			sent.Add(1)
			select {
			case <-stop:
				return
			default:
			}
		}
	})
	defer func() {
		close(stop)
		_ = flooder.CloseNow()
		wg.Wait()
	}()

	// Honest traffic until the flooder is closed.
	deadline := time.Now().Add(60 * time.Second)
	for round := 0; n.Counter("broker_session_closes_total", "reason", protocol.CloseReasonSlowConsumer) < 1; round++ {
		if peak.Load() >= rssLimit {
			t.Fatalf("RSS reached %d MB (from %d MB) while one session flooded list_peers", peak.Load()>>20, before>>20)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the flooder was not closed as a slow consumer within 60 s (%d list_peers sent, RSS peak %d MB)", sent.Load(), peak.Load()>>20)
		}
		exchange(t, sender, rcpt, mesh.Members[2], 2, fmt.Sprintf("r%d", round))
	}
	exchange(t, sender, rcpt, mesh.Members[2], 5, "after")
	if peak.Load() >= rssLimit {
		t.Fatalf("RSS peaked at %d MB", peak.Load()>>20)
	}
	if n.Counter("broker_list_peers_throttled_total") < 1 || n.Counter("broker_slow_consumers_total") < 1 {
		t.Fatal("the flood was neither paced nor counted as a slow consumer")
	}
	t.Logf("flooder sent %d list_peers before it was closed; RSS %d MB before, peak %d MB", sent.Load(), before>>20, peak.Load()>>20)
}

// MAX_SESSIONS_PER_MEMBER counts a member's live and grace sessions,
// ephemeral ones included, cluster-wide: a hello over it gets capacity. An
// ephemeral session that closes frees its place at once; a reattach takes
// none. Another member is unaffected.
func TestSessionsPerMemberCap(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxSessionsPerMember = 4 }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	m0, honest := mesh.Members[0], mesh.Members[1]
	eph := client.HelloOptions{Capabilities: []string{protocol.CapEphemeral}}
	a := testkit.Connect(t, n.URL(), m0, client.HelloOptions{SessionID: "a"})
	testkit.Connect(t, n.URL(), m0, client.HelloOptions{SessionID: "b"})
	e1 := testkit.Connect(t, n.URL(), m0, eph)
	testkit.Connect(t, n.URL(), m0, eph)
	h := testkit.Connect(t, n.URL(), honest, client.HelloOptions{})

	rejected := func(o client.HelloOptions) {
		t.Helper()
		c := testkit.Dial(t, n.URL())
		testkit.Write(t, c, client.NewHello(m0, o))
		expectRejection(t, c, protocol.ReasonCapacity)
	}
	rejected(eph)
	rejected(client.HelloOptions{SessionID: "c"})
	exchange(t, a, h, honest, 3, "at-cap")

	// A closed session waits in grace and still counts; it may reattach.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "a in grace", func() bool {
		e, ok := n.Replica().FindSession(mesh.MeshID, m0.MemberID, "a")
		return ok && e.InGrace()
	})
	rejected(eph)
	a = testkit.Connect(t, n.URL(), m0, client.HelloOptions{SessionID: "a"})
	exchange(t, a, h, honest, 3, "reattached")

	// A closed ephemeral session is gone at once.
	if err := e1.Close(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "the ephemeral session gone", func() bool {
		return n.Replica().MemberSessions(m0.MemberID) == 3
	})
	testkit.Connect(t, n.URL(), m0, eph)
	if got := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonCapacity); got != 3 {
		t.Fatalf("%v capacity rejections, want 3", got)
	}
}

// Any database role may NOTIFY on the member channel. A revocation notice
// for a member who is not revoked closes nobody (it is checked against the
// database first), malformed notices are counted and ignored, and a real
// revocation still closes its member's sessions within seconds. Honest
// messages flow throughout.
func TestForgedRevocationNotice(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 4)
	victim := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	sender := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	rcpt := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{})
	revoked := testkit.Connect(t, n.URL(), mesh.Members[3], client.HelloOptions{})
	other := testkit.OtherRole(t, db)
	ctx := context.Background()

	notify := func(payload string) {
		t.Helper()
		if _, err := other.Exec(ctx, "SELECT pg_notify($1, $2)", store.MemberChannel, payload); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 20 {
		notify(mesh.MeshID + "|" + mesh.Members[0].MemberID + "|revoked")
		notify(mesh.MeshID + "|" + mesh.Members[i%3].MemberID + "|revoked")
		exchange(t, sender, rcpt, mesh.Members[2], 1, fmt.Sprintf("forged-%d", i))
	}
	for _, bad := range []string{"", "|x|revoked", mesh.MeshID + "|" + strings.Repeat("m", 200) + "|revoked",
		mesh.MeshID + "|\x01|gone", mesh.MeshID + "|a|b|c"} {
		notify(bad)
	}
	testkit.Eventually(t, 10*time.Second, "the forged notices checked and refuted", func() bool {
		return n.Counter("broker_revocations_refuted_total") >= 1 && n.Counter("broker_relay_rejected_total", "reason", "malformed") >= 4
	})

	// A real revocation, sent after the forged ones, closes its member.
	start := time.Now()
	if _, err := admin.RevokeMember(ctx, n.Store(), mesh.MeshID, mesh.Members[3].Pubkey()); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		_, err := revoked.Next(cctx)
		var ce *client.CloseError
		if errors.As(err, &ce) {
			if ce.Code != 1008 || ce.Reason != protocol.ReasonUnauthorized {
				t.Fatalf("revoked member closed %d %q", ce.Code, ce.Reason)
			}
			break
		}
		if err != nil {
			t.Fatalf("the revoked member was not closed within 5 s: %v", err)
		}
	}
	t.Logf("real revocation closed its session in %s", time.Since(start).Round(time.Millisecond))

	// Nobody else was closed: every other session still sends and receives.
	exchange(t, sender, victim, mesh.Members[0], 3, "victim-in")
	exchange(t, victim, rcpt, mesh.Members[2], 3, "victim-out")
	exchange(t, rcpt, sender, mesh.Members[1], 3, "sender-in")
	for _, c := range []*client.Conn{victim, sender, rcpt} {
		if err := c.Err(); err != nil {
			t.Fatalf("a session of a member that is not revoked was closed: %v", err)
		}
	}
	if got := n.Counter("broker_session_closes_total", "reason", protocol.ReasonUnauthorized); got != 1 {
		t.Fatalf("%v sessions closed unauthorized, want 1 (the revoked member's)", got)
	}
}
