package server_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// fromAddr is an HTTP client whose connections come from local address ip
// (any 127.x address reaches a node on 127.0.0.1), so that a test can be
// a second remote address.
func fromAddr(ip string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
}

// A valid member of mesh A tries to reach mesh B by every route a member
// has: sending to B's members and groups, listing peers, acknowledging and
// inspecting B's messages, hooks against B's sessions, and hellos that
// claim B's mesh id. Each is refused or has no effect on B.
func TestCrossMeshIsolation(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	meshA := testkit.NewMesh(t, n.Store(), 2)
	meshB := testkit.NewMesh(t, n.Store(), 2)
	a0, a1, b0, b1 := meshA.Members[0], meshA.Members[1], meshB.Members[0], meshB.Members[1]
	ackCaps := []string{protocol.CapClientAck}
	ca0 := testkit.Connect(t, n.URL(), a0, client.HelloOptions{Capabilities: ackCaps})
	ca1 := testkit.Connect(t, n.URL(), a1, client.HelloOptions{})
	cb0 := testkit.Connect(t, n.URL(), b0, client.HelloOptions{PID: 4242, Cwd: "/b/project", Groups: []string{"ops"},
		Capabilities: ackCaps})
	// b1 stays offline: B's messages to it wait in the queue.

	t.Run("send to another mesh's member", func(t *testing.T) {
		if ack := testkit.Send(t, ca0, protocol.Send{TargetSpec: b0.Pubkey(), Ciphertext: "eA=="}); ack.Queued || ack.Error != protocol.CodeUnknownRecipient {
			t.Fatalf("ack %+v, want unknown_recipient", ack)
		}
	})
	t.Run("send to another mesh's group", func(t *testing.T) {
		if ack := testkit.Send(t, ca0, protocol.Send{TargetSpec: "@ops", Ciphertext: "eA=="}); ack.Queued || ack.Error != protocol.CodeNoRecipients {
			t.Fatalf("ack %+v, want no_recipients", ack)
		}
	})
	t.Run("broadcast stays in the mesh", func(t *testing.T) {
		ack := testkit.Send(t, ca0, protocol.Send{TargetSpec: "*", Ciphertext: "YWxs"})
		if !ack.Queued {
			t.Fatalf("broadcast: %+v", ack)
		}
		if p := testkit.ExpectPush(t, ca1, 5*time.Second); p.MessageID != ack.MessageID {
			t.Fatalf("a1 got %+v", p)
		}
		noPush(t, cb0, 300*time.Millisecond)
	})
	t.Run("list_peers", func(t *testing.T) {
		var got []string
		for _, p := range listPeers(t, ca0) {
			got = append(got, p.Pubkey)
		}
		want := []string{a0.Pubkey(), a1.Pubkey()}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("a0 lists %v, want only mesh A's %v", got, want)
		}
	})

	// A message of mesh B, queued for b1 (offline).
	ackB := testkit.Send(t, cb0, protocol.Send{TargetSpec: b1.Pubkey(), Ciphertext: "Yi1zZWNyZXQ="})
	if !ackB.Queued {
		t.Fatalf("B's send: %+v", ackB)
	}
	t.Run("client_ack of another mesh's message", func(t *testing.T) {
		// a0 acks B's message, then one of its own: once its own shows
		// delivered, the batch holding the bogus ack was applied too.
		own := testkit.Send(t, ca1, protocol.Send{TargetSpec: a0.Pubkey(), Ciphertext: "b3du"})
		if p := testkit.ExpectPush(t, ca0, 5*time.Second); p.MessageID != own.MessageID {
			t.Fatalf("a0 got %+v", p)
		}
		testkit.Write(t, ca0, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: ackB.MessageID})
		testkit.Write(t, ca0, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: own.MessageID})
		testkit.Eventually(t, 5*time.Second, "a0's own ack applied", func() bool {
			res := messageStatus(t, ca1, own.MessageID)
			return len(res.Recipients) == 1 && res.Recipients[0].State == protocol.StateDelivered
		})
		res := messageStatus(t, cb0, ackB.MessageID)
		if len(res.Recipients) != 1 || res.Recipients[0].MemberID != b1.MemberID || res.Recipients[0].State != protocol.StateQueued {
			t.Fatalf("B's message after a0's ack: %+v, want queued for b1", res)
		}
	})
	t.Run("message_status of another mesh's message", func(t *testing.T) {
		res := messageStatus(t, ca0, ackB.MessageID)
		if res.Error != protocol.CodeNotFound || len(res.Recipients) != 0 {
			t.Fatalf("a0 sees B's message: %+v", res)
		}
	})
	t.Run("hello claiming another mesh", func(t *testing.T) {
		// A's key, signing for mesh B with its own member id and with a B
		// member's id: the signature verifies, the membership does not.
		for _, memberID := range []string{a0.MemberID, b0.MemberID} {
			c := testkit.Dial(t, n.URL())
			testkit.Write(t, c, client.NewHello(client.Identity{MeshID: meshB.MeshID, MemberID: memberID, Priv: a0.Priv}, client.HelloOptions{}))
			expectRejection(t, c, protocol.ReasonUnauthorized)
		}
	})
	t.Run("signed hook against another mesh's session", func(t *testing.T) {
		body := []byte(`{"cwd":"/b/project","pid":4242,"status":"working"}`)
		url := n.HTTPURL() + "/hook/set-status"
		// Signed as a member of A: it cannot resolve to B's session.
		h := http.Header{"X-Forwarded-For": {"203.0.113.7"}}
		auth.SignHook(h, a0.Priv, meshA.MeshID, body, time.Now())
		if code, out := testkit.PostJSON(t, url, body, h); code != http.StatusOK || out["presence_id"] != nil {
			t.Fatalf("A's hook for B's (pid, cwd): %d %v, want accepted as pending for A only", code, out)
		}
		// Claiming mesh B with A's key: not a member there.
		h = http.Header{"X-Forwarded-For": {"203.0.113.7"}}
		auth.SignHook(h, a0.Priv, meshB.MeshID, body, time.Now())
		if code, _ := testkit.PostJSON(t, url, body, h); code != http.StatusUnauthorized {
			t.Fatalf("A's key signing for mesh B: %d, want 401", code)
		}
		if s := testkit.LiveStatus(n, b0.MemberID); s != protocol.StatusIdle {
			t.Fatalf("B's session is %q after A's hooks", s)
		}
		// The pending status A left for (pid, cwd) does not apply to B's
		// next session in that place either.
		again := testkit.Connect(t, n.URL(), b0, client.HelloOptions{SessionID: "b0-again", PID: 4242, Cwd: "/b/project"})
		for _, p := range listPeers(t, again) {
			if p.SessionID == "b0-again" && p.Status != protocol.StatusIdle {
				t.Fatalf("B's new session starts %q", p.Status)
			}
		}
	})
	// B's message still reaches its real recipient.
	cb1 := testkit.Connect(t, n.URL(), b1, client.HelloOptions{})
	if p := testkit.ExpectPush(t, cb1, 5*time.Second); p.MessageID != ackB.MessageID || p.Ciphertext != "Yi1zZWNyZXQ=" {
		t.Fatalf("b1 got %+v, want B's message", p)
	}
}

// A revoked member's signatures are refused: its hello (unauthorized) and
// its signed hooks (401).
func TestRevokedMemberSignatures(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	gone := mesh.AddMember(t, n.Store(), "gone")
	body := []byte(`{"cwd":"/r","pid":9,"status":"working"}`)
	hookAs := func() int {
		h := http.Header{"X-Forwarded-For": {"203.0.113.8"}}
		auth.SignHook(h, gone.Priv, mesh.MeshID, body, time.Now())
		code, _ := testkit.PostJSON(t, n.HTTPURL()+"/hook/set-status", body, h)
		return code
	}
	if code := hookAs(); code != http.StatusOK {
		t.Fatalf("member's hook before revocation: %d", code)
	}
	if _, err := admin.RevokeMember(context.Background(), n.Store(), mesh.MeshID, gone.Pubkey()); err != nil {
		t.Fatal(err)
	}
	// The node learns of the revocation through the member channel.
	testkit.Eventually(t, 5*time.Second, "revoked member's hook refused", func() bool { return hookAs() == http.StatusUnauthorized })
	c := testkit.Dial(t, n.URL())
	testkit.Write(t, c, client.NewHello(gone, client.HelloOptions{}))
	expectRejection(t, c, protocol.ReasonUnauthorized)
}

// /join refuses to enrol a public key of small order, for which anyone
// could sign (and whose messages anyone could decrypt).
func TestJoinRefusesWeakKeys(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "weak keys", "")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 10, time.Hour, "member", "ws://x/ws")
	if err != nil {
		t.Fatal(err)
	}
	for _, weak := range []string{
		strings.Repeat("0", 64),        // order 4
		"01" + strings.Repeat("0", 62), // the identity
	} {
		if code, r := testkit.JoinWith(t, n.HTTPURL(), inv.Token, weak, "weak"); code != http.StatusBadRequest || r.Error != "malformed" {
			t.Errorf("join with key %s: %d %+v, want 400 malformed", weak, code, r)
		}
	}
	if code, r := testkit.Join(t, n.HTTPURL(), inv.Token, "strong"); code != http.StatusOK {
		t.Fatalf("join with a real key: %d %+v", code, r)
	}
}

// A flood of connections from one address: beyond MAX_CONNECTIONS_PER_ADDR
// each is refused with HTTP 429 before the upgrade and counted; another
// address is unaffected; closing connections frees their places.
func TestConnectionFloodFromOneAddress(t *testing.T) {
	db := pgtest.NewDB(t)
	const perAddr = 20
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.ConnsPerAddr = perAddr }})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var open []*websocket.Conn
	defer func() {
		for _, c := range open {
			c.CloseNow()
		}
	}()
	for i := 0; i < perAddr; i++ {
		c, _, err := websocket.Dial(ctx, n.URL(), nil)
		if err != nil {
			t.Fatalf("connection %d of %d: %v", i+1, perAddr, err)
		}
		open = append(open, c)
	}
	// The server counts a connection just after its 101 is written; the
	// client may see the 101 first.
	testkit.Eventually(t, 5*time.Second, "connections counted", func() bool {
		return n.Counter("broker_connections_total") == perAddr
	})
	before := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonRateLimited)
	accepted := n.Counter("broker_connections_total")
	const flood = 300
	for i := 0; i < flood; i++ {
		c, resp, err := websocket.Dial(ctx, n.URL(), nil)
		if err == nil {
			c.CloseNow()
			t.Fatalf("connection %d over the limit was accepted", perAddr+i+1)
		}
		if resp == nil || resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("connection over the limit: %v, want HTTP 429", err)
		}
	}
	if got := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonRateLimited) - before; got != flood {
		t.Fatalf("counted %v refused connections, want %d", got, flood)
	}
	if n.Counter("broker_connections_total") != accepted {
		t.Fatal("a refused connection was upgraded")
	}
	// Another address connects and says hello during the flood.
	other, err := client.Dial(ctx, n.URL(), &client.DialOptions{HTTPClient: fromAddr("127.0.0.2")})
	if err != nil {
		t.Fatalf("another address: %v", err)
	}
	defer other.CloseNow()
	if _, err := other.Hello(ctx, mesh.Members[0], client.HelloOptions{}); err != nil {
		t.Fatalf("another address: %v", err)
	}
	// Closing connections frees their places.
	for _, c := range open[:5] {
		c.Close(websocket.StatusNormalClosure, "")
	}
	open = open[5:]
	testkit.Eventually(t, 5*time.Second, "places freed", func() bool {
		c, _, err := websocket.Dial(ctx, n.URL(), nil)
		if err != nil {
			return false
		}
		open = append(open, c)
		return true
	})
}

// A flood of hellos with bad signatures from one address: beyond
// HELLO_RATE_PER_SEC (bucket of twice that, plus one) they are refused
// rate_limited before any signature is checked, so the ed25519 work an
// attacker can cause is bounded by the rate, not by its bandwidth. The
// counters prove it: bad_signature grows by at most the bucket plus the
// rate times the flood's duration. Another address is served meanwhile.
func TestHelloFloodRateLimitedBeforeVerify(t *testing.T) {
	db := pgtest.NewDB(t)
	const rate = 20
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.HelloRatePerSec = rate }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	victim := mesh.Members[0]
	_, forger, _ := ed25519.GenerateKey(rand.Reader)
	forged := func() protocol.Hello {
		h := client.NewHello(victim, client.HelloOptions{})
		h.Signature = client.NewHello(client.Identity{MeshID: victim.MeshID, MemberID: victim.MemberID, Priv: forger}, client.HelloOptions{}).Signature
		return h
	}
	label := func(r string) float64 { return n.Counter("broker_connections_rejected_total", "reason", r) }
	badBefore, limitedBefore := label(protocol.ReasonBadSignature), label(protocol.ReasonRateLimited)

	const total, workers = 1000, 16
	var next, answered atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= total {
				if err := floodHello(n.URL(), forged()); err != nil {
					errs <- err
					return
				}
				answered.Add(1)
			}
		}()
	}
	// Meanwhile a correct hello from another address is accepted.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	other, err := client.Dial(ctx, n.URL(), &client.DialOptions{HTTPClient: fromAddr("127.0.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	defer other.CloseNow()
	if _, err := other.Hello(ctx, mesh.Members[1], client.HelloOptions{}); err != nil {
		t.Fatalf("another address during the flood: %v", err)
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	bad, limited := label(protocol.ReasonBadSignature)-badBefore, label(protocol.ReasonRateLimited)-limitedBefore
	bucket := 2*rate + 1
	allowed := float64(bucket) + rate*elapsed.Seconds() + 1
	t.Logf("RESULT hello flood: %d bad-signature hellos from one address in %s: %v verified (bad_signature), %v refused rate_limited before verification (bound %.0f)",
		total, elapsed.Round(time.Millisecond), bad, limited, allowed)
	if bad+limited != total || answered.Load() != total {
		t.Fatalf("%v bad_signature + %v rate_limited, want %d answered", bad, limited, total)
	}
	if bad > allowed {
		t.Fatalf("%v signatures verified in %s: more than the %.0f the per-address limit allows", bad, elapsed, allowed)
	}
}

// floodHello sends one hello on a new connection and waits for its
// rejection.
func floodHello(url string, h protocol.Hello) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	if err := c.WriteJSON(ctx, h); err != nil {
		return err
	}
	_, err = c.WaitHelloAck(ctx)
	var he *client.HelloError
	if !errors.As(err, &he) {
		return fmt.Errorf("forged hello: %v, want a rejection", err)
	}
	return nil
}

// Hook floods: one (pid, cwd) beyond HOOK_RATE_LIMIT_PER_MIN gets 429, and
// signed hooks with bad signatures from one address are refused 429
// before their signature is checked once over the per-address rate; both
// are counted.
func TestHookFlood(t *testing.T) {
	db := pgtest.NewDB(t)
	const perMin, helloRate = 30, 20
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) {
		c.HookRateLimitPerMin = perMin
		c.HelloRatePerSec = helloRate
	}})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	url := n.HTTPURL() + "/hook/set-status"
	counted := n.Counter("broker_hook_requests_rate_limited_total")

	codes := map[int]int{}
	for i := 0; i < 100; i++ {
		code, _ := testkit.PostJSON(t, n.HookURL(), []byte(`{"cwd":"/flood","pid":77,"status":"working"}`), nil)
		codes[code]++
	}
	// The bucket holds a minute's worth; a few more may refill meanwhile.
	if codes[http.StatusOK] < perMin || codes[http.StatusOK] > perMin+2 || codes[http.StatusOK]+codes[http.StatusTooManyRequests] != 100 {
		t.Fatalf("unsigned flood of one (pid, cwd): %v, want %d accepted and the rest 429", codes, perMin)
	}

	body := []byte(`{"cwd":"/flood2","pid":78,"status":"working"}`)
	_, forger, _ := ed25519.GenerateKey(rand.Reader)
	signed := map[int]int{}
	start := time.Now()
	for i := 0; i < 300; i++ {
		h := http.Header{"X-Forwarded-For": {"203.0.113.9"}}
		auth.SignHook(h, forger, mesh.MeshID, body, time.Now())
		h.Set(auth.HeaderPubkey, mesh.Members[0].Pubkey()) // claims to be a member; the signature is not theirs
		code, _ := testkit.PostJSON(t, url, body, h)
		signed[code]++
	}
	elapsed := time.Since(start)
	allowed := 2*helloRate + 1 + helloRate*elapsed.Seconds() + 1
	if float64(signed[http.StatusUnauthorized]) > allowed || signed[http.StatusUnauthorized]+signed[http.StatusTooManyRequests] != 300 {
		t.Fatalf("forged signed hooks: %v in %s, want at most %.0f checked (401) and the rest 429", signed, elapsed, allowed)
	}
	limited := codes[http.StatusTooManyRequests] + signed[http.StatusTooManyRequests]
	if got := n.Counter("broker_hook_requests_rate_limited_total") - counted; got != float64(limited) {
		t.Fatalf("broker_hook_requests_rate_limited_total grew by %v, want %d", got, limited)
	}
	t.Logf("RESULT hook flood: one (pid, cwd) %v; 300 forged signed hooks from one address in %s: %v", codes, elapsed.Round(time.Millisecond), signed)
}

// Inputs at and past every size limit get a clear refusal and leave the
// connection usable (or closed with the documented code).
func TestOversizedInputs(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	expectError := func(frame []byte, code string) {
		t.Helper()
		testkit.Write(t, c, frame)
		var e protocol.ErrorFrame
		if err := testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e); err != nil || e.Code != code {
			t.Fatalf("%.60s…: %+v, want error %s", frame, e, code)
		}
	}

	t.Run("summary", func(t *testing.T) {
		expectError([]byte(`{"type":"set_summary","summary":"`+strings.Repeat("x", protocol.MaxSummaryLen+1)+`"}`), protocol.CodeTooLarge)
		// The limit is in bytes: 200 four-byte characters are too many.
		expectError([]byte(`{"type":"set_summary","summary":"`+strings.Repeat("🚀", 200)+`"}`), protocol.CodeTooLarge)
		testkit.Write(t, c, []byte(`{"type":"set_summary","summary":"`+strings.Repeat("y", protocol.MaxSummaryLen)+`"}`))
		peers := listPeers(t, c)
		if len(peers) != 1 || peers[0].Summary != strings.Repeat("y", protocol.MaxSummaryLen) {
			t.Fatalf("512-byte summary not kept: %+v", peers)
		}
	})
	t.Run("groups", func(t *testing.T) {
		for i := 0; i < protocol.MaxGroups; i++ {
			testkit.Write(t, c, protocol.GroupOp{Type: protocol.TypeJoinGroup, Name: fmt.Sprintf("g%d", i)})
		}
		expectError([]byte(`{"type":"join_group","name":"one-too-many"}`), protocol.CodeTooLarge)
		expectError([]byte(`{"type":"join_group","name":"`+strings.Repeat("n", protocol.MaxGroupNameLen+1)+`"}`), protocol.CodeMalformed)
		if peers := listPeers(t, c); len(peers[0].Groups) != protocol.MaxGroups {
			t.Fatalf("%d groups, want %d", len(peers[0].Groups), protocol.MaxGroups)
		}
	})
	t.Run("hello with 10,000 groups", func(t *testing.T) {
		h := client.NewHello(mesh.Members[1], client.HelloOptions{})
		for i := 0; i < 10000; i++ {
			h.Groups = append(h.Groups, protocol.Group{Name: fmt.Sprint(i)})
		}
		// Over MAX_MESSAGE_BYTES (64 KiB) the frame itself is refused.
		d := testkit.Dial(t, n.URL())
		testkit.Write(t, d, h)
		testkit.ExpectCloseCode(t, d, int(websocket.StatusMessageTooBig))
		// Under a larger frame limit the hello is malformed (at most 64).
		big := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxMessageBytes = 1 << 20 }})
		d = testkit.Dial(t, big.URL())
		testkit.Write(t, d, h)
		expectRejection(t, d, protocol.ReasonMalformed)
	})
	t.Run("cwd", func(t *testing.T) {
		d := testkit.Dial(t, n.URL())
		testkit.Write(t, d, client.NewHello(mesh.Members[1], client.HelloOptions{Cwd: "/" + strings.Repeat("d", protocol.MaxCwdLen)}))
		expectRejection(t, d, protocol.ReasonMalformed)
		ok := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{Cwd: "/" + strings.Repeat("d", protocol.MaxCwdLen-1)})
		ok.Close()
		testkit.Hook(t, n.HookURL(), `{"cwd":"/`+strings.Repeat("d", protocol.MaxCwdLen)+`","status":"idle"}`, http.StatusBadRequest)
	})
	t.Run("frame over the limit before the hello", func(t *testing.T) {
		d := testkit.Dial(t, n.URL())
		testkit.Write(t, d, []byte(`{"type":"hello","cwd":"`+strings.Repeat("x", 70000)+`"}`))
		testkit.ExpectCloseCode(t, d, int(websocket.StatusMessageTooBig))
	})
	// After all that the first connection still works.
	testkit.Write(t, c, protocol.ListPeers{Type: protocol.TypeListPeers})
	testkit.Expect(t, c, protocol.TypePeersList, 5*time.Second)
}

// Unicode edge cases travel unchanged wherever the broker keeps text
// (display names, summaries, cwd, hostname, group names); invalid UTF-8
// inside a JSON string is replaced with U+FFFD by the decoder, never a
// crash, and a group name carrying it is refused.
func TestUnicodeEdgeCases(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	// Combining marks, emoji with ZWJ, right-to-left override, a
	// zero-width space, a 4-byte mathematical letter, a BOM.
	weird := "Zoe\u0301 👩\u200d💻 \u202eevil\u202c\u200b𝕏\ufeff"
	sender := mesh.Members[0]
	named := mesh.AddMember(t, n.Store(), weird)
	c := testkit.Connect(t, n.URL(), named, client.HelloOptions{Cwd: "/home/" + weird, Hostname: "hôte-" + weird,
		Groups: []string{"équipe-🚀"}})
	s := testkit.Connect(t, n.URL(), sender, client.HelloOptions{})
	summary := weird + " \\ \" quotes"
	// A NUL is refused (Postgres and terminals cannot take it); the
	// summary is kept as it was.
	testkit.Write(t, c, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: weird + " \u0000 nul"})
	var nulErr protocol.ErrorFrame
	if err := testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&nulErr); err != nil || nulErr.Code != protocol.CodeMalformed {
		t.Fatalf("summary with NUL: %+v", nulErr)
	}
	testkit.Write(t, c, protocol.SetSummary{Type: protocol.TypeSetSummary, Summary: summary})
	testkit.Eventually(t, 5*time.Second, "summary applied", func() bool {
		for _, p := range listPeers(t, s) {
			if p.MemberID == named.MemberID {
				return p.Summary == summary
			}
		}
		return false
	})
	for _, p := range listPeers(t, s) {
		if p.MemberID != named.MemberID {
			continue
		}
		if p.DisplayName != weird || p.Cwd != "/home/"+weird || p.Hostname != "hôte-"+weird || !slices.Equal(p.Groups, []string{"équipe-🚀"}) {
			t.Fatalf("peer altered: %+v", p)
		}
	}
	// A unicode group name works as a target.
	ack := testkit.Send(t, s, protocol.Send{TargetSpec: "@équipe-🚀", Ciphertext: "8J+agA=="})
	if p := testkit.ExpectPush(t, c, 5*time.Second); !ack.Queued || p.MessageID != ack.MessageID || p.SenderName != "p0" {
		t.Fatalf("group send: %+v, push %+v", ack, p)
	}
	// Invalid UTF-8 inside JSON strings (raw bytes 0xff, a lone surrogate
	// escape).
	testkit.Write(t, c, []byte("{\"type\":\"set_summary\",\"summary\":\"a\xffb\\ud800c\"}"))
	testkit.Eventually(t, 5*time.Second, "replaced summary", func() bool {
		for _, p := range listPeers(t, s) {
			if p.MemberID == named.MemberID {
				return p.Summary == "a\ufffdb\ufffdc"
			}
		}
		return false
	})
	testkit.Write(t, c, []byte("{\"type\":\"join_group\",\"name\":\"bad\xffname\"}"))
	var e protocol.ErrorFrame
	if err := testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e); err != nil || e.Code != protocol.CodeMalformed {
		t.Fatalf("group name with invalid UTF-8: %+v", e)
	}
}

// A flood of malformed frames after the hello (and of frames before it):
// every one is answered with an error, the connection stays usable, and
// once the connections close the node is back to the goroutines and heap
// it had before.
func TestMalformedFloodNoLeak(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	// A first connection warms up the node's lazily started parts.
	testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{}).Close()
	testkit.Eventually(t, 5*time.Second, "warm-up session gone", func() bool { return n.Counter("broker_connections_active") == 0 })
	goroutines, heap := settledBaseline(t)

	bad := [][]byte{
		[]byte(`not json`), []byte(`{"type":`), []byte(`[]`), []byte(`""`), []byte(`{}`), []byte(`{"type":42}`),
		[]byte(`{"type":"teleport"}`), []byte(`{"type":"send","targetSpec":1,"ciphertext":"x"}`),
		[]byte(`{"type":"send","targetSpec":"*","ciphertext":["x"]}`), []byte(`{"type":"client_ack","brokerMessageId":5}`),
		[]byte(`{"type":"client_ack","brokerMessageId":"-1"}`), []byte(`{"type":"set_status","status":["idle"]}`),
		[]byte(`{"type":"set_summary","summary":{}}`), []byte(`{"type":"join_group","name":null}`),
		[]byte(`{"type":"message_status","messageId":7}`), []byte(`{"type":"ping","_reqId":7}`),
		[]byte(`{"type":"hello"}`), []byte(`{"type":"send","priority":"urgent","targetSpec":"*","ciphertext":"x"}`),
		[]byte("{\"type\":\"\xff\xfe\"}"), []byte(strings.Repeat("[", 4000)),
	}
	const rounds, perRound = 3, 1000
	for r := 0; r < rounds; r++ {
		c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{SessionID: fmt.Sprint("flood-", r)})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		for i := 0; i < perRound; i++ {
			if err := c.WriteRaw(ctx, bad[i%len(bad)]); err != nil {
				t.Fatal(err)
			}
		}
		// One answer per frame: an error, or a rejected ack for sends.
		for i := 0; i < perRound; i++ {
			f, err := c.Next(ctx)
			if err != nil {
				t.Fatalf("round %d: answer %d: %v", r, i, err)
			}
			var a protocol.Ack
			if !(f.Type == protocol.TypeError || (f.Type == protocol.TypeAck && f.Decode(&a) == nil && !a.Queued)) {
				t.Fatalf("round %d: answer %d is %s", r, i, f.Raw)
			}
		}
		cancel()
		testkit.Write(t, c, []byte(`{"type":"ping","_reqId":"alive"}`))
		testkit.Expect(t, c, protocol.TypePong, 5*time.Second)
		c.Close()
	}
	// Before the hello: no_hello for each, then the hello still works.
	c := testkit.Dial(t, n.URL())
	for i := 0; i < 200; i++ {
		testkit.Write(t, c, []byte(`{"type":"list_peers"}`))
	}
	for i := 0; i < 200; i++ {
		var e protocol.ErrorFrame
		if err := testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e); err != nil || e.Code != protocol.CodeNoHello {
			t.Fatalf("frame %d before hello: %+v", i, e)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Hello(ctx, mesh.Members[0], client.HelloOptions{SessionID: "after-no-hello"}); err != nil {
		t.Fatal(err)
	}
	c.Close()

	testkit.Eventually(t, 10*time.Second, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= goroutines })
	// 3,000 frames of up to 4 KB went through; none may stay behind.
	const slack = 8 << 20
	if _, after := settledBaseline(t); after > heap+slack {
		t.Fatalf("heap in use grew from %d to %d bytes", heap, after)
	}
}

// settledBaseline returns the goroutine count and heap in use once the
// heap has been collected.
func settledBaseline(t *testing.T) (int, uint64) {
	t.Helper()
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return runtime.NumGoroutine(), ms.HeapInuse
}
