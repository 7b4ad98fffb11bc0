package httpapi_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"sync/atomic"
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

// viaProxy sends a request as a trusted proxy does: from 127.0.0.1, naming
// its client in X-Forwarded-For. Redirects are not followed.
func viaProxy(method, url, contentType string, body []byte, client string, header http.Header) (int, string, error) {
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", contentType)
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("X-Forwarded-For", client)
	hc := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// flood runs send from two workers until it has been answered 429 at
// least twice and stop is called (at most 300 requests each); any answer
// other than 429 or one of ok fails t.
func flood(t *testing.T, what string, send func(i int) (int, string, error), ok ...int) (limited *atomic.Int64, stop func()) {
	t.Helper()
	limited = new(atomic.Int64)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Go(func() {
			for i := 0; i < 300; i++ {
				select {
				case <-quit:
					return
				default:
				}
				code, body, err := send(w*1000 + i)
				switch {
				case err != nil:
					t.Errorf("%s flood: %v", what, err)
					return
				case code == http.StatusTooManyRequests:
					limited.Add(1)
				case !containsInt(ok, code):
					t.Errorf("%s flood: %d %.200s", what, code, body)
					return
				}
			}
		})
	}
	var once sync.Once
	return limited, func() { once.Do(func() { close(quit); wg.Wait() }) }
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// Finding 1 for the HTTP routes: behind a trusted proxy, one client that
// floods signed hooks, /join and /status logins uses up only its own
// budget (the client address the proxy names, not the proxy's): it is
// answered 429 while another client behind the same proxy, flooding
// nothing, is served on every route meanwhile.
func TestHTTPBudgetsPerClientBehindProxy(t *testing.T) {
	const rate = 5 // a bucket of 11 per client and route
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"}
		c.HelloRatePerSec = rate
		c.AdminToken = statusToken
	}})
	base := n.HTTPURL()
	mesh := testkit.NewMesh(t, n.Store(), 2)
	flooder, honest := mesh.Members[0], mesh.Members[1]
	testkit.Connect(t, n.URL(), honest, client.HelloOptions{PID: 21, Cwd: "/honest"})
	const badClient, goodClient = "198.51.100.7", "198.51.100.8"
	const ct = "application/json"

	t.Run("signed hooks", func(t *testing.T) {
		limited, stop := flood(t, "hook", func(i int) (int, string, error) {
			body, h := signedHook(flooder, fmt.Sprintf(`{"cwd":"/flood","pid":%d,"status":"working"}`, 100+i))
			return viaProxy(http.MethodPost, base+"/hook/set-status", ct, body, badClient, h)
		}, http.StatusOK)
		defer stop()
		testkit.Eventually(t, 20*time.Second, "the hook flooder limited", func() bool { return limited.Load() >= 2 })
		statuses := []string{protocol.StatusWorking, protocol.StatusIdle}
		for i := 0; i < 8; i++ {
			// Each signed afresh: a distinct millisecond, so that two equal
			// bodies do not carry one signature (a replay).
			body := []byte(fmt.Sprintf(`{"cwd":"/honest","pid":21,"status":%q}`, statuses[i%2]))
			h := http.Header{}
			auth.SignHook(h, honest.Priv, honest.MeshID, body, time.Now().Add(time.Duration(i)*time.Millisecond))
			code, out, err := viaProxy(http.MethodPost, base+"/hook/set-status", ct, body, goodClient, h)
			if err != nil || code != http.StatusOK {
				t.Fatalf("honest hook %d behind the proxy during the flood: %d %s %v", i, code, out, err)
			}
		}
		testkit.Eventually(t, 5*time.Second, "the honest status", func() bool {
			return testkit.LiveStatus(n, honest.MemberID) == protocol.StatusIdle
		})
	})

	t.Run("join", func(t *testing.T) {
		inv, err := admin.CreateInvite(context.Background(), n.Store(), mesh.MeshID, 100, time.Hour, "member", "ws://x/ws")
		if err != nil {
			t.Fatal(err)
		}
		_, fpriv, _ := ed25519.GenerateKey(rand.Reader)
		junk, _ := json.Marshal(httpapi.JoinRequest{InviteToken: "not-an-invite", PeerPubkey: auth.PubkeyHex(fpriv), DisplayName: "flood"})
		limited, stop := flood(t, "join", func(int) (int, string, error) {
			return viaProxy(http.MethodPost, base+"/join", ct, junk, badClient, nil)
		}, http.StatusBadRequest)
		defer stop()
		testkit.Eventually(t, 20*time.Second, "the join flooder limited", func() bool { return limited.Load() >= 2 })
		for i := 0; i < 3; i++ {
			_, priv, _ := ed25519.GenerateKey(rand.Reader)
			name := fmt.Sprint("newcomer", i)
			pi, err := auth.ParseInvite(inv.Token)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := json.Marshal(httpapi.JoinRequest{InviteToken: inv.Token, PeerPubkey: auth.PubkeyHex(priv), DisplayName: name,
				Signature: auth.SignJoin(priv, pi, name)})
			code, out, err := viaProxy(http.MethodPost, base+"/join", ct, body, goodClient, nil)
			if err != nil || code != http.StatusOK {
				t.Fatalf("honest join %d behind the proxy during the flood: %d %s %v", i, code, out, err)
			}
		}
	})

	t.Run("status login", func(t *testing.T) {
		form := "application/x-www-form-urlencoded"
		wrong := []byte(neturl.Values{"token": {"guess"}}.Encode())
		limited, stop := flood(t, "login", func(int) (int, string, error) {
			return viaProxy(http.MethodPost, base+"/status/login", form, wrong, badClient, nil)
		}, http.StatusUnauthorized)
		defer stop()
		testkit.Eventually(t, 20*time.Second, "the login flooder limited", func() bool { return limited.Load() >= 2 })
		// The honest operator's typo is answered with the form, not 429:
		// its budget is its own.
		for i := 0; i < 3; i++ {
			code, out, err := viaProxy(http.MethodPost, base+"/status/login", form, wrong, goodClient, nil)
			if err != nil || code != http.StatusUnauthorized || !strings.Contains(out, "not the ADMIN_TOKEN") {
				t.Fatalf("honest mistyped login %d behind the proxy during the flood: %d %.200s %v", i, code, out, err)
			}
		}
		right := []byte(neturl.Values{"token": {statusToken}}.Encode())
		if code, out, err := viaProxy(http.MethodPost, base+"/status/login", form, right, goodClient, nil); err != nil || code != http.StatusSeeOther {
			t.Fatalf("honest login behind the proxy during the flood: %d %.200s %v", code, out, err)
		}
		code, _, err := viaProxy(http.MethodGet, base+"/status.json", ct, nil, goodClient, http.Header{"Authorization": {"Bearer " + statusToken}})
		if err != nil || code != http.StatusOK {
			t.Fatalf("honest /status.json: %d %v", code, err)
		}
	})
}
