package httpapi_test

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/httpapi"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// signedHook is a hook body with its signature headers, as the CLI sends it.
func signedHook(id client.Identity, body string) ([]byte, http.Header) {
	h := http.Header{}
	auth.SignHook(h, id.Priv, id.MeshID, []byte(body), time.Now())
	return []byte(body), h
}

// Finding 8: a same-host proxy that adds no forwarding header (socat,
// ssh -L, a sidecar; nginx by default) makes every public request come
// from 127.0.0.1. Unsigned hooks through it are refused, as are unsigned
// hooks straight from loopback on the public port; honest hooks work:
// signed ones through the proxy, unsigned ones on the local hook port.
func TestUnsignedHookThroughSameHostProxyRefused(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	victim := mesh.Members[0]
	testkit.Connect(t, n.URL(), victim, client.HelloOptions{PID: 4242, Cwd: "/victim"})
	tcp := "http://" + testkit.TCPForward(t, n.Addr()) + "/hook/set-status"
	target, _ := neturl.Parse(n.HTTPURL())
	rp := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(target) }})
	t.Cleanup(rp.Close)
	viaHTTP := rp.URL + "/hook/set-status"

	attack := []byte(`{"cwd":"/victim","pid":4242,"status":"dnd"}`)
	for name, url := range map[string]string{"tcp forwarder": tcp, "reverse proxy without X-Forwarded-For": viaHTTP,
		"loopback, straight": n.HTTPURL() + "/hook/set-status"} {
		if code, out := testkit.PostJSON(t, url, attack, nil); code != http.StatusUnauthorized {
			t.Errorf("unsigned hook via %s: %d %v, want 401", name, code, out)
		}
	}
	// Honest hooks meanwhile: signed through the proxy, unsigned locally.
	body, h := signedHook(victim, `{"cwd":"/victim","pid":4242,"status":"working"}`)
	if code, out := testkit.PostJSON(t, tcp, body, h); code != http.StatusOK || out["presence_id"] == nil {
		t.Fatalf("signed hook through the forwarder: %d %v", code, out)
	}
	testkit.Eventually(t, 5*time.Second, "the signed hook applied", func() bool { return testkit.LiveStatus(n, victim.MemberID) == protocol.StatusWorking })
	if code, out := testkit.PostJSON(t, n.HookURL(), []byte(`{"cwd":"/victim","pid":4242,"status":"idle"}`), nil); code != http.StatusOK {
		t.Fatalf("unsigned hook on the local hook port: %d %v", code, out)
	}
	testkit.Eventually(t, 5*time.Second, "the local hook applied", func() bool { return testkit.LiveStatus(n, victim.MemberID) == protocol.StatusIdle })
	if s := testkit.LiveStatus(n, victim.MemberID); s == protocol.StatusDND {
		t.Fatal("an unsigned public hook set the victim's status")
	}
	// The local port is POST /hook/set-status only.
	resp, err := http.Get(strings.TrimSuffix(n.HookURL(), "/hook/set-status") + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /health on the local hook port: %d, want 404", resp.StatusCode)
	}
}

// With HOOK_REQUIRE_SIGNATURE=false the operator has chosen to take
// unsigned hooks on the public port, from anywhere.
func TestUnsignedHooksOnPublicPortWhenConfigured(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) { c.HookRequireSignature = "false" }})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{PID: 7, Cwd: "/p"})
	if code, out := testkit.PostJSON(t, n.HTTPURL()+"/hook/set-status", []byte(`{"cwd":"/p","pid":7,"status":"working"}`), nil); code != http.StatusOK || out["presence_id"] == nil {
		t.Fatalf("unsigned hook with HOOK_REQUIRE_SIGNATURE=false: %d %v", code, out)
	}
}

// Finding 10: a signed hook is one-time. Captured and replayed (to the
// same node or another), it is refused, so the attacker cannot flip the
// member back to a status it reported earlier; the member's fresh hooks
// keep working.
func TestSignedHookReplayRefused(t *testing.T) {
	db := pgtest.NewDB(t)
	a := testkit.StartNode(t, db, testkit.Options{})
	b := testkit.StartNode(t, db, testkit.Options{Join: []*testkit.Node{a}})
	mesh := testkit.NewMesh(t, a.Store(), 1)
	m := mesh.Members[0]
	testkit.Connect(t, a.URL(), m, client.HelloOptions{PID: 11, Cwd: "/r"})

	working, wh := signedHook(m, `{"cwd":"/r","pid":11,"status":"working"}`)
	if code, out := testkit.PostJSON(t, a.HTTPURL()+"/hook/set-status", working, wh); code != http.StatusOK {
		t.Fatalf("first use: %d %v", code, out)
	}
	idle, ih := signedHook(m, `{"cwd":"/r","pid":11,"status":"idle"}`)
	if code, out := testkit.PostJSON(t, a.HTTPURL()+"/hook/set-status", idle, ih); code != http.StatusOK {
		t.Fatalf("the member's next hook: %d %v", code, out)
	}
	testkit.Eventually(t, 5*time.Second, "idle", func() bool { return testkit.LiveStatus(a, m.MemberID) == protocol.StatusIdle })
	for name, node := range map[string]*testkit.Node{"same node": a, "another node": b} {
		code, out := testkit.PostJSON(t, node.HTTPURL()+"/hook/set-status", working, wh)
		if code != http.StatusUnauthorized || !strings.Contains(fmt.Sprint(out["error"]), "already used") {
			t.Errorf("replay to %s: %d %v, want 401 already used", name, code, out)
		}
	}
	if s := testkit.LiveStatus(a, m.MemberID); s != protocol.StatusIdle {
		t.Fatalf("after the replays the member is %q, want idle", s)
	}
	again, ah := signedHook(m, `{"cwd":"/r","pid":11,"status":"working"}`)
	if code, out := testkit.PostJSON(t, b.HTTPURL()+"/hook/set-status", again, ah); code != http.StatusOK {
		t.Fatalf("a fresh hook after the replays: %d %v", code, out)
	}
}

// slowBody sends a request's headers promising a body, then trickles the
// body a byte every 100 ms. It returns how long the server kept reading
// before it answered or closed, and whether it did so before the body was
// complete.
func slowBody(t *testing.T, addr, path string) (time.Duration, bool) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const size = 60
	start := time.Now()
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", path, size); err != nil {
		t.Fatal(err)
	}
	ended := make(chan time.Duration, 1)
	go func() {
		_, _ = bufio.NewReader(conn).ReadString('\n') // an answer or EOF: the server stopped reading
		ended <- time.Since(start)
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for i := 0; i < size-1; i++ {
		select {
		case d := <-ended:
			return d, true
		case <-tick.C:
		}
		if _, err := conn.Write([]byte(" ")); err != nil {
			return <-ended, true
		}
	}
	return time.Since(start), false
}

// Finding 10: a request whose body trickles in is cut off at
// HTTP_READ_TIMEOUT instead of holding its goroutine for as long as the
// client likes; honest requests are answered meanwhile.
func TestSlowBodyCutOff(t *testing.T) {
	const limit = time.Second
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.HTTPReadTimeout = limit
		c.AdminToken = "slow-body-admin-token"
	}})
	stop := make(chan struct{})
	var honest sync.WaitGroup
	var served, failed int
	honest.Go(func() {
		for i := 0; i < 200; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			resp, err := http.Get(n.HTTPURL() + "/health")
			if err != nil {
				failed++
				continue
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				served++
			} else {
				failed++
			}
		}
	})
	for _, path := range []string{"/hook/set-status", "/join", "/status/login"} {
		d, cut := slowBody(t, n.Addr(), path)
		if !cut || d > 3*limit {
			t.Errorf("slow body on %s: the server was still reading after %s (cut: %v), want it cut off after about %s", path, d.Round(time.Millisecond), cut, limit)
		}
		if d < limit/2 {
			t.Errorf("slow body on %s cut after %s, before HTTP_READ_TIMEOUT %s", path, d, limit)
		}
	}
	close(stop)
	honest.Wait()
	if served == 0 || failed != 0 {
		t.Fatalf("honest requests during the slow bodies: %d served, %d failed", served, failed)
	}
}

// Finding 10: /join looks at the invite before membership: an expired,
// revoked or used-up invite answers a member's key exactly as it answers
// anyone's, so it cannot be used to find out who is a member. A valid
// invite is redeemed meanwhile.
func TestJoinNoMembershipOracle(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "oracle", "")
	if err != nil {
		t.Fatal(err)
	}
	base := n.HTTPURL()
	_, member, _ := ed25519.GenerateKey(rand.Reader)
	first, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Hour, "member", "ws://x/ws")
	if code, r := testkit.JoinAs(t, base, first.Token, member, "member"); code != http.StatusOK {
		t.Fatalf("member's join: %d %+v", code, r)
	}
	expired, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 5, time.Millisecond, "member", "ws://x/ws")
	revoked, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 5, time.Hour, "member", "ws://x/ws")
	if err := n.Store().RevokeInvite(ctx, revoked.InviteID); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 2*time.Second, "invite expiry", func() bool { return time.Now().After(expired.ExpiresAt.Add(10 * time.Millisecond)) })
	valid, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 100, time.Hour, "member", "ws://x/ws")

	var wg sync.WaitGroup
	honestOK := make(chan int, 10)
	for i := 0; i < 10; i++ {
		wg.Go(func() {
			code, _ := testkit.Join(t, base, valid.Token, fmt.Sprintf("honest%d", i))
			honestOK <- code
		})
	}
	for name, token := range map[string]string{"expired": expired.Token, "revoked": revoked.Token, "used up": first.Token} {
		_, stranger, _ := ed25519.GenerateKey(rand.Reader)
		mc, mr := testkit.JoinAs(t, base, token, member, "member")
		sc, sr := testkit.JoinAs(t, base, token, stranger, "member")
		if mc != http.StatusGone || mr.AlreadyMember || mr.MemberID != "" {
			t.Errorf("%s invite, a member's key: %d %+v, want 410 and nothing about the member", name, mc, mr)
		}
		if mc != sc || mr.Error != sr.Error || mr.Message != sr.Message {
			t.Errorf("%s invite answers a member %d %q and a stranger %d %q: an oracle", name, mc, mr.Error, sc, sr.Error)
		}
	}
	wg.Wait()
	close(honestOK)
	for code := range honestOK {
		if code != http.StatusOK {
			t.Fatalf("an honest join during the probes: %d", code)
		}
	}
}

// Finding 9/10: /join needs proof that the joiner holds the key it enrols.
// Without it (the original client's body), with a signature by another
// key, over another name or another invite, nothing is enrolled; the
// honest, signed join works. JOIN_REQUIRE_PROOF=false lets the original
// client's body in, and still refuses a wrong proof.
func TestJoinRequiresProof(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	lax := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.JoinRequireProof = "false" }})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "proof", "")
	if err != nil {
		t.Fatal(err)
	}
	inv, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 100, time.Hour, "member", "ws://x/ws")
	other, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 100, time.Hour, "member", "ws://x/ws")
	parsed, _ := auth.ParseInvite(inv.Token)
	parsedOther, _ := auth.ParseInvite(other.Token)
	_, victim, _ := ed25519.GenerateKey(rand.Reader)
	_, attacker, _ := ed25519.GenerateKey(rand.Reader)
	victimKey := auth.PubkeyHex(victim)

	honest := 0
	for name, tc := range map[string]struct {
		sig  string
		code string
	}{
		"no proof (the original client's body)": {"", "proof_required"},
		"signed by another key":                 {auth.SignJoin(attacker, parsed, "alice"), "bad_proof"},
		"signed for another name":               {auth.SignJoin(victim, parsed, "mallory"), "bad_proof"},
		"signed for another invite":             {auth.SignJoin(victim, parsedOther, "alice"), "bad_proof"},
		"not hex":                               {strings.Repeat("zz", 64), "bad_proof"},
	} {
		code, r := testkit.JoinBody(t, n.HTTPURL(), httpapi.JoinRequest{InviteToken: inv.Token, PeerPubkey: victimKey, DisplayName: "alice", Signature: tc.sig})
		if code != http.StatusUnauthorized || r.Error != tc.code {
			t.Errorf("%s: %d %+v, want 401 %s", name, code, r, tc.code)
		}
		honest++ // display names are unique in a mesh
		if code, r := testkit.Join(t, n.HTTPURL(), inv.Token, fmt.Sprintf("honest-%d", honest)); code != http.StatusOK {
			t.Fatalf("an honest join between the attempts: %d %+v", code, r)
		}
	}
	if _, err := n.Store().MemberByPubkey(ctx, mesh.MeshID, victimKey); err == nil {
		t.Fatal("an unproven join enrolled the victim's key")
	}
	code, r := testkit.JoinAs(t, n.HTTPURL(), inv.Token, victim, "alice")
	if code != http.StatusOK || r.AlreadyMember {
		t.Fatalf("the key's holder joins: %d %+v", code, r)
	}

	// The escape hatch for original clients.
	_, legacy, _ := ed25519.GenerateKey(rand.Reader)
	if code, r := testkit.JoinWith(t, lax.HTTPURL(), inv.Token, auth.PubkeyHex(legacy), "legacy"); code != http.StatusOK {
		t.Fatalf("JOIN_REQUIRE_PROOF=false, the original body: %d %+v", code, r)
	}
	_, late, _ := ed25519.GenerateKey(rand.Reader)
	code, r = testkit.JoinBody(t, lax.HTTPURL(), httpapi.JoinRequest{InviteToken: inv.Token, PeerPubkey: auth.PubkeyHex(late), DisplayName: "late",
		Signature: auth.SignJoin(attacker, parsed, "late")})
	if code != http.StatusUnauthorized || r.Error != "bad_proof" {
		t.Fatalf("JOIN_REQUIRE_PROOF=false, a wrong proof: %d %+v, want 401 bad_proof", code, r)
	}
}

// METRICS_TOKEN guards /metrics (on the public port here); Go's profiler
// is served only with PPROF=true, on METRICS_ADDR, behind the same token.
func TestMetricsTokenAndProfiler(t *testing.T) {
	const token = "metrics-token-0123456789"
	get := func(url, bearer string) int {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MetricsToken = token }})
	for bearer, want := range map[string]int{"": http.StatusUnauthorized, "wrong-token-0123456789": http.StatusUnauthorized, token: http.StatusOK} {
		if got := get(n.MetricsURL(), bearer); got != want {
			t.Errorf("GET /metrics with %q: %d, want %d", bearer, got, want)
		}
	}
	if got := get(n.HTTPURL()+"/debug/pprof/", token); got != http.StatusNotFound {
		t.Errorf("pprof on the public port: %d, want 404", got)
	}

	private := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MetricsAddr = "127.0.0.1:0" }})
	pprofURL := strings.TrimSuffix(private.MetricsURL(), "/metrics") + "/debug/pprof/"
	if got := get(pprofURL, ""); got != http.StatusNotFound {
		t.Errorf("pprof without PPROF=true: %d, want 404", got)
	}
	prof := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) {
		c.MetricsAddr, c.PProf, c.MetricsToken = "127.0.0.1:0", true, token
	}})
	pprofURL = strings.TrimSuffix(prof.MetricsURL(), "/metrics") + "/debug/pprof/"
	if got := get(pprofURL, ""); got != http.StatusUnauthorized {
		t.Errorf("pprof without the token: %d, want 401", got)
	}
	if got := get(pprofURL, token); got != http.StatusOK {
		t.Errorf("pprof with PPROF=true and the token: %d, want 200", got)
	}
}
