package httpapi_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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

// The hook route: 400 for a bad body, 413 over MAX_MESSAGE_BYTES, 401 when
// unsigned on the public port, 429 over the per-client, per-session rate;
// a signed hook may change only its signer's sessions.
func TestHookRoute(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) {
		c.HookRateLimitPerMin = 3
		c.MaxMessageBytes = 2048
	}})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]
	ca := testkit.Connect(t, n.URL(), a, client.HelloOptions{PID: 10, Cwd: "/shared"})
	testkit.Connect(t, n.URL(), b, client.HelloOptions{PID: 10, Cwd: "/shared"})
	url := n.HTTPURL() + "/hook/set-status"

	for _, body := range []string{`{`, `{"cwd":"/x"}`, `{"cwd":"/x","status":"sleeping"}`, `{"status":"idle"}`, `{"cwd":"/x","status":"idle","pid":"7"}`} {
		if code, _ := testkit.PostJSON(t, url, []byte(body), nil); code != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", body, code)
		}
	}
	if code, _ := testkit.PostJSON(t, url, []byte(`{"cwd":"`+strings.Repeat("x", 3000)+`","status":"idle"}`), nil); code != http.StatusRequestEntityTooLarge {
		t.Errorf("big body: status %d, want 413", code)
	}
	proxied := http.Header{"X-Forwarded-For": {"203.0.113.9"}}
	if code, _ := testkit.PostJSON(t, url, []byte(`{"cwd":"/shared","pid":10,"status":"working"}`), proxied); code != http.StatusUnauthorized {
		t.Errorf("unsigned from afar: status %d, want 401", code)
	}

	// Signed by a: only a's session changes, even though b has the same (pid, cwd).
	body := []byte(`{"cwd":"/shared","pid":10,"status":"working"}`)
	h := http.Header{"X-Forwarded-For": {"203.0.113.9"}}
	auth.SignHook(h, a.Priv, mesh.MeshID, body, time.Now())
	code, out := testkit.PostJSON(t, url, body, h)
	if code != http.StatusOK || out["presence_id"] == nil {
		t.Fatalf("signed hook: %d %v", code, out)
	}
	testkit.Eventually(t, 5*time.Second, "a working", func() bool { return testkit.LiveStatus(n, a.MemberID) == "working" })
	if s := testkit.LiveStatus(n, b.MemberID); s != "idle" {
		t.Fatalf("b's status changed to %s by a's hook", s)
	}
	// A tampered body fails the signature.
	code, _ = testkit.PostJSON(t, url, []byte(`{"cwd":"/shared","pid":10,"status":"idle"}`), h)
	if code != http.StatusUnauthorized {
		t.Fatalf("tampered signed hook: %d, want 401", code)
	}
	// A non-member's signature is refused.
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	h2 := http.Header{}
	auth.SignHook(h2, stranger, mesh.MeshID, body, time.Now())
	if code, _ := testkit.PostJSON(t, url, body, h2); code != http.StatusUnauthorized {
		t.Fatalf("stranger's hook: %d, want 401", code)
	}

	// Rate limit: 3 per minute per client and session (here: one local
	// client, no session yet).
	limited := 0
	for i := 0; i < 5; i++ {
		code, _ := testkit.PostJSON(t, n.HookURL(), []byte(`{"cwd":"/rl","pid":5,"status":"idle"}`), nil)
		if code == http.StatusTooManyRequests {
			limited++
		}
	}
	if limited != 2 {
		t.Fatalf("%d of 5 hooks limited, want 2", limited)
	}
	if n.Counter("broker_hook_requests_rate_limited_total") < 2 {
		t.Fatal("rate limiting not counted")
	}
	_ = ca
}

// /join: owner-signed invites, expiry, revocation, use count by
// compare-and-set under concurrency, idempotent re-join.
func TestJoin(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "join test", "")
	if err != nil {
		t.Fatal(err)
	}
	base := n.HTTPURL()

	inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 1, time.Hour, "member", "ws://x/ws")
	if err != nil {
		t.Fatal(err)
	}
	// Five concurrent joins of a single-use invite: exactly one succeeds.
	var wg sync.WaitGroup
	codes := make([]int, 5)
	errs := make([]string, 5)
	for i := range codes {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var r httpapi.JoinResponse
			codes[i], r = testkit.Join(t, base, inv.Token, fmt.Sprintf("peer%d", i))
			errs[i] = r.Error
		}(i)
	}
	wg.Wait()
	ok, exhausted := 0, 0
	for i := range codes {
		switch {
		case codes[i] == http.StatusOK:
			ok++
		case errs[i] == "invite_exhausted":
			exhausted++
		}
	}
	if ok != 1 || exhausted != 4 {
		t.Fatalf("codes %v errors %v: want 1 success and 4 exhausted", codes, errs)
	}

	// Idempotent re-join does not spend a use; once the invite is used up
	// it answers nobody, members included (no membership oracle).
	inv2, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 2, time.Hour, "admin", "ws://x/ws")
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	code, r1 := testkit.JoinAs(t, base, inv2.Token, priv, "carol")
	if code != http.StatusOK || r1.AlreadyMember || r1.Role != "admin" || r1.MeshID != mesh.MeshID {
		t.Fatalf("join: %d %+v", code, r1)
	}
	code, r2 := testkit.JoinAs(t, base, inv2.Token, priv, "carol")
	if code != http.StatusOK || !r2.AlreadyMember || r2.MemberID != r1.MemberID {
		t.Fatalf("re-join: %d %+v", code, r2)
	}
	if code, r := testkit.Join(t, base, inv2.Token, "dave"); code != http.StatusOK || r.AlreadyMember {
		t.Fatalf("second use after a re-join: %d %+v, want a new member (the re-join spent nothing)", code, r)
	}
	if code, r := testkit.JoinAs(t, base, inv2.Token, priv, "carol"); code != http.StatusGone || r.Error != "invite_exhausted" {
		t.Fatalf("re-join through a used-up invite: %d %+v, want 410 invite_exhausted", code, r)
	}
	// The enrolled member can connect at once.
	testkit.Connect(t, n.URL(), client.Identity{MeshID: mesh.MeshID, MemberID: r1.MemberID, Priv: priv}, client.HelloOptions{})

	// Expired.
	expired, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 5, time.Millisecond, "member", "ws://x/ws")
	testkit.Eventually(t, 2*time.Second, "invite expiry", func() bool { return time.Now().After(expired.ExpiresAt) })
	if code, r := testkit.Join(t, base, expired.Token, "late"); code != http.StatusGone || r.Error != "invite_expired" {
		t.Fatalf("expired: %d %+v", code, r)
	}
	// Revoked.
	revoked, _ := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 5, time.Hour, "member", "ws://x/ws")
	if err := n.Store().RevokeInvite(ctx, revoked.InviteID); err != nil {
		t.Fatal(err)
	}
	if code, r := testkit.Join(t, base, revoked.Token, "r"); code != http.StatusGone || r.Error != "invite_revoked" {
		t.Fatalf("revoked: %d %+v", code, r)
	}
	// Tampered: the role upgraded by hand breaks the signature.
	p, _ := auth.ParseInvite(inv.Token)
	p.Role = "admin"
	if code, r := testkit.Join(t, base, p.Token(), "t"); code != http.StatusBadRequest || r.Error != "invite_bad_signature" {
		t.Fatalf("tampered: %d %+v", code, r)
	}
	// Signed by someone who is not the owner.
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	p.Role = "member"
	p.Sign(other)
	if code, r := testkit.Join(t, base, p.Token(), "o"); code != http.StatusBadRequest || r.Error != "invite_owner_mismatch" {
		t.Fatalf("foreign signer: %d %+v", code, r)
	}
	if code, r := testkit.Join(t, base, "garbage", "g"); code != http.StatusBadRequest || r.Error != "invite_malformed" {
		t.Fatalf("garbage: %d %+v", code, r)
	}
}

// /health reports the node and cluster size; /metrics exposes the seed's
// series and the commit→push histogram.
func TestHealthAndMetrics(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	resp, err := http.Get(n.HTTPURL() + "/health")
	if err != nil {
		t.Fatal(err)
	}
	var h httpapi.Health
	_ = json.NewDecoder(resp.Body).Decode(&h)
	resp.Body.Close()
	if resp.StatusCode != 200 || h.Status != "ok" || h.DB != "up" || h.Node != n.Name() || h.ClusterSize != 1 || h.Version == "" {
		t.Fatalf("health %d %+v", resp.StatusCode, h)
	}
	mesh := testkit.NewMesh(t, n.Store(), 2)
	s := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	r := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	testkit.Send(t, s, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Priority: "now", Ciphertext: "bQ=="})
	testkit.ExpectPush(t, r, 5*time.Second)
	testkit.Eventually(t, 5*time.Second, "histogram sample", func() bool { return n.Counter("broker_commit_to_push_seconds") >= 1 })
	resp, err = http.Get(n.HTTPURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"broker_connections_total", "broker_connections_rejected_total", "broker_connections_active",
		"broker_messages_routed_total", "broker_messages_rejected_total", "broker_queue_depth", "broker_ttl_sweeps_total",
		"broker_hook_requests_total", "broker_hook_requests_rate_limited_total", "broker_db_healthy",
		"broker_commit_to_push_seconds_bucket", "broker_cluster_members", "broker_presence_entries",
		"broker_relay_notifications_sent_total", "broker_relay_notifications_received_total", "broker_relay_lag_seconds_bucket"} {
		if !strings.Contains(string(body), name) {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	if !strings.Contains(string(body), `broker_messages_routed_total{priority="now"} 1`) {
		t.Errorf("routed counter not incremented")
	}
}

// With METRICS_ADDR, /metrics is served on its own listener and not on the
// public port.
func TestMetricsAddr(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) { c.MetricsAddr = "127.0.0.1:0" }})
	resp, err := http.Get(n.HTTPURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("public /metrics: %d, want 404", resp.StatusCode)
	}
	resp, err = http.Get(n.MetricsURL())
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "broker_connections_total") {
		t.Fatalf("metrics listener: %d", resp.StatusCode)
	}
}
