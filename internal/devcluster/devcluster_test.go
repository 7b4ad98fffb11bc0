package devcluster_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/devcluster"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// freePorts returns the first of n consecutive ports that are free on
// 127.0.0.1 for TCP and UDP. It searches below the kernel's ephemeral range
// (32768 and up on Linux), so ports handed out for ":0" listeners by
// concurrently running tests cannot collide with it.
func freePorts(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 200; try++ {
		base := 20000 + rand.IntN(12000-n)
		if portsFree(base, n) {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports found", n)
	return 0
}

func portsFree(base, n int) bool {
	var closers []func() error
	defer func() {
		for _, c := range closers {
			_ = c()
		}
	}()
	for p := base; p < base+n; p++ {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		closers = append(closers, ln.Close)
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		closers = append(closers, pc.Close)
	}
	return true
}

// `broker dev` mirrors docker-compose.yml: a private Postgres (here the
// test's), three nodes gossiping with each other, and a load balancer on one
// port in front of them. A demo member connects through the load balancer
// and sees the other demo member, connected straight to a node; after Stop
// the load balancer's port is closed.
func TestDevClusterMirrorsCompose(t *testing.T) {
	base := &config.Config{DatabaseURL: pgtest.NewDB(t), Host: "127.0.0.1"}
	base.Normalize()
	ports := freePorts(t, 8) // 3 HTTP, 3 gossip, 1 LB, 1 local hooks
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := devcluster.Start(ctx, devcluster.Options{
		Nodes: 3, DataDir: t.TempDir(), BasePort: ports, GossipPort: ports + 3, LBPort: ports + 6, HookPort: ports + 7,
		ShowKeys: true, Base: base, Logger: testkit.Logger(t), Out: &out,
	})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = c.Stop(context.Background())
		}
	})
	lbURL := "ws://127.0.0.1:" + strconv.Itoa(ports+6) + "/ws"
	if c.LB == nil || c.LB.URL() != lbURL {
		t.Fatalf("lb = %v, want one at %s", c.LB, lbURL)
	}
	if !strings.Contains(out.String(), "lb     "+lbURL) {
		t.Fatalf("the banner does not show the lb URL %s:\n%s", lbURL, out.String())
	}
	hookURL := "http://127.0.0.1:" + strconv.Itoa(ports+7) + "/hook/set-status"
	if c.Nodes[0].HookURL() != hookURL || !strings.Contains(out.String(), "hooks  "+hookURL) {
		t.Fatalf("local hooks at %q, want %s, shown in the banner:\n%s", c.Nodes[0].HookURL(), hookURL, out.String())
	}
	testkit.Eventually(t, 30*time.Second, "the dev nodes to gossip", func() bool {
		for _, n := range c.Nodes {
			if n.Cluster().NumMembers() != 3 {
				return false
			}
		}
		return true
	})

	identity := func(m devcluster.DemoMember) client.Identity {
		key, err := hex.DecodeString(m.SecretKey)
		if err != nil || len(key) != ed25519.PrivateKeySize {
			t.Fatalf("demo member %s: bad secret key", m.Name)
		}
		return client.Identity{MeshID: c.Demo.MeshID, MemberID: m.MemberID, Priv: ed25519.PrivateKey(key)}
	}
	if len(c.Demo.Keyed) != 2 || !strings.Contains(out.String(), c.Demo.Keyed[0].SecretKey) {
		t.Fatalf("--keys: keyed members %+v, banner:\n%s", c.Demo.Keyed, out.String())
	}
	alice, bob := identity(c.Demo.Keyed[0]), identity(c.Demo.Keyed[1])
	hello(t, c.Nodes[2].URL(), bob)
	conn, _ := hello(t, c.LB.URL(), alice)
	testkit.Eventually(t, 10*time.Second, "bob in alice's peer list", func() bool {
		wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer wcancel()
		if err := conn.WriteJSON(wctx, map[string]string{"type": protocol.TypeListPeers}); err != nil {
			t.Fatal(err)
		}
		var pl protocol.PeersList
		if err := testkit.Expect(t, conn, protocol.TypePeersList, 5*time.Second).Decode(&pl); err != nil {
			t.Fatal(err)
		}
		for _, p := range pl.Peers {
			if p.Pubkey == bob.Pubkey() && p.Node == c.Nodes[2].Name() {
				return true
			}
		}
		return false
	})

	// Hooks as a local Claude Code sends them: claudemesh's signed ones to
	// the balancer, unsigned ones only to the local hook address.
	body := []byte(`{"cwd":"/dev/proj","pid":77,"status":"working"}`)
	hc := http.Header{}
	auth.SignHook(hc, alice.Priv, alice.MeshID, body, time.Now())
	for _, tc := range []struct {
		name, url string
		h         http.Header
		want      int
	}{
		{"signed, through the lb", c.LB.HTTPURL() + "/hook/set-status", hc, http.StatusOK},
		{"unsigned, through the lb", c.LB.HTTPURL() + "/hook/set-status", nil, http.StatusUnauthorized},
		{"unsigned, to a node", c.Nodes[1].HTTPURL() + "/hook/set-status", nil, http.StatusUnauthorized},
		{"unsigned, to the local hook address", hookURL, nil, http.StatusOK},
	} {
		req, _ := http.NewRequest(http.MethodPost, tc.url, bytes.NewReader(body))
		for k, v := range tc.h {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("hook %s: %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}

	if err := c.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopped = true
	_, err = net.DialTimeout("tcp", c.LB.Addr(), time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial the lb after Stop: %v, want connection refused", err)
	}
}
