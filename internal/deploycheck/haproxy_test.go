package deploycheck_test

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// hello opens a WebSocket through url and returns it with the node that
// accepted it.
func hello(t *testing.T, url string, id client.Identity) (*client.Conn, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	ack, err := c.Hello(ctx, id, client.HelloOptions{})
	if err != nil {
		t.Fatalf("hello through %s: %v", url, err)
	}
	return c, ack.Node
}

// startHAProxy runs the compose file's haproxy.cfg with only its listen
// address and its servers' addresses swapped for test nodes (by compose
// service name), and returns its base HTTP URL once it serves /health.
func startHAProxy(t *testing.T, nodes map[string]*testkit.Node) string {
	t.Helper()
	haproxy := tool(t, "haproxy", "haproxy")
	original := readRepoFile(t, "deploy/compose/haproxy.cfg")
	hc := parseHAProxy(t, original)
	lbPort := freePort(t)
	cfg := string(original)
	swap := func(old, new string) {
		if strings.Count(cfg, old) != 1 {
			t.Fatalf("haproxy.cfg: %q is not there exactly once", old)
		}
		cfg = strings.Replace(cfg, old, new, 1)
	}
	swap("bind "+hc.bind, "bind 127.0.0.1:"+strconv.Itoa(lbPort))
	for name, addr := range hc.servers {
		host := addr[:strings.LastIndex(addr, ":")]
		swap("server "+name+" "+addr, "server "+name+" "+nodes[host].Addr())
	}
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(haproxy, "-db", "-f", path)
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("haproxy output:\n%s", logs.String())
		}
	})
	base := "http://127.0.0.1:" + strconv.Itoa(lbPort)
	testkit.Eventually(t, 15*time.Second, "HAProxy to serve /health", func() bool {
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("haproxy exited: %v", err)
		default:
		}
		resp, err := http.Get(base + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return base
}

// composeNodes starts one test node per compose broker node, with the
// compose file's client-address settings, its trusted proxy swapped for
// 127.0.0.1 (where the test's HAProxy connects from).
func composeNodes(t *testing.T, cc composeCluster) map[string]*testkit.Node {
	t.Helper()
	db := pgtest.NewDB(t)
	configure := func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"}
		c.ClientIPHeader = cc.brokers[cc.nodes[0]].ClientIPHeader
	}
	first := testkit.StartNode(t, db, testkit.Options{Configure: configure})
	nodes := map[string]*testkit.Node{cc.nodes[0]: first}
	for _, name := range cc.nodes[1:] {
		nodes[name] = testkit.StartNode(t, db, testkit.Options{Configure: configure, Join: []*testkit.Node{first}})
	}
	return nodes
}

// HAProxy runs the compose file's haproxy.cfg, with only its listen
// address and its servers' addresses swapped for three test nodes: it
// passes WebSockets to every node, envelopes flow through it both ways,
// and when a node stops, new connections go to the other nodes.
func TestHAProxyInFrontOfNodes(t *testing.T) {
	cc := loadComposeCluster(t)
	nodes := composeNodes(t, cc)
	first := nodes[cc.nodes[0]]
	base := startHAProxy(t, nodes)
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws"

	mesh := testkit.NewMesh(t, first.Store(), 2)
	alice, bob := mesh.Members[0], mesh.Members[1]
	recv, n1 := hello(t, wsURL, bob)
	send, n2 := hello(t, wsURL, alice)
	_, n3 := hello(t, wsURL, alice)
	got := []string{n1, n2, n3}
	slices.Sort(got)
	var want []string
	for _, n := range nodes {
		want = append(want, n.Name())
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("three WebSockets through HAProxy landed on %v, want one per node %v (leastconn)", got, want)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := send.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: "h-1", TargetSpec: bob.Pubkey(),
		Priority: "now", Nonce: "bm9uY2U=", Ciphertext: "dmlhIGhhcHJveHk="}); err != nil {
		t.Fatal(err)
	}
	if p := testkit.ExpectPush(t, recv, 10*time.Second); p.Ciphertext != "dmlhIGhhcHJveHk=" {
		t.Fatalf("push through HAProxy = %+v", p)
	}

	stopped := nodes[cc.nodes[1]]
	sctx, scancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer scancel()
	if err := stopped.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		if _, node := hello(t, wsURL, alice); node == stopped.Name() {
			t.Fatalf("connection %d went to the stopped node", i)
		}
	}
}
