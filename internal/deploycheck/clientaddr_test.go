package deploycheck_test

import (
	"context"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// trusted parses a deployment's TRUSTED_PROXIES.
func trusted(t *testing.T, where string, cfg *config.Config) []netip.Prefix {
	t.Helper()
	p, err := clientaddr.ParseTrusted(cfg.TrustedProxies)
	if err != nil {
		t.Fatalf("%s: TRUSTED_PROXIES: %v", where, err)
	}
	if len(p) == 0 {
		t.Errorf("%s: TRUSTED_PROXIES is empty: every peer behind the platform's proxy would be one address", where)
	}
	return p
}

// hookAndJoinDefaults checks that a shipped deployment keeps the safe
// defaults: no unsigned hooks anywhere, joins need proof, no profiler.
func hookAndJoinDefaults(t *testing.T, where string, cfg *config.Config) {
	t.Helper()
	if cfg.HookLocalAddr != "" || !cfg.RequireHookSignature() {
		t.Errorf("%s accepts unsigned hooks (HOOK_LOCAL_ADDR %q, HOOK_REQUIRE_SIGNATURE %q)", where, cfg.HookLocalAddr, cfg.HookRequireSignature)
	}
	if !cfg.RequireJoinProof() || cfg.PProf {
		t.Errorf("%s: JOIN_REQUIRE_PROOF %q, PPROF %v; want proofs required and no profiler", where, cfg.JoinRequireProof, cfg.PProf)
	}
}

// Each shipped deployment names the client the way its proxy does, and
// trusts nothing an attacker can connect from: compose only HAProxy's fixed
// address (which HAProxy's forwardfor feeds), Fly the proxy with
// Fly-Client-IP and never the organisation-wide 6PN network, Railway its
// edge and never the private IPv6 network.
func TestDeploymentsTrustOnlyTheirProxy(t *testing.T) {
	cc := loadComposeCluster(t)
	lb := cc.p.Services["lb"]
	lbNet, ok := lb.Networks["default"]
	if !ok || lbNet == nil || lbNet.Ipv4Address == "" {
		t.Fatalf("compose lb has no fixed address on the default network: %+v", lb.Networks)
	}
	lbIP, err := netip.ParseAddr(lbNet.Ipv4Address)
	if err != nil {
		t.Fatalf("lb ipv4_address %q: %v", lbNet.Ipv4Address, err)
	}
	inSubnet := false
	for _, pool := range cc.p.Networks["default"].Ipam.Config {
		if p, err := netip.ParsePrefix(pool.Subnet); err == nil && p.Contains(lbIP) {
			inSubnet = true
		}
	}
	if !inSubnet {
		t.Errorf("lb address %s is not in the default network's subnet %+v", lbIP, cc.p.Networks["default"].Ipam.Config)
	}
	for _, name := range cc.nodes {
		cfg := cc.brokers[name]
		p := trusted(t, "compose "+name, cfg)
		if len(p) != 1 || p[0] != netip.PrefixFrom(lbIP, 32) {
			t.Errorf("compose %s trusts %v, want only the lb, %s/32", name, p, lbIP)
		}
		if cfg.ClientIPHeader != clientaddr.HeaderForwardedFor || cfg.ProxyProtocol {
			t.Errorf("compose %s reads %s (PROXY %v); HAProxy's forwardfor writes X-Forwarded-For", name, cfg.ClientIPHeader, cfg.ProxyProtocol)
		}
		hookAndJoinDefaults(t, "compose "+name, cfg)
	}
	if !strings.Contains(string(readRepoFile(t, "deploy/compose/haproxy.cfg")), "\n    option forwardfor\n") {
		t.Error("haproxy.cfg does not add X-Forwarded-For (option forwardfor)")
	}

	fc := loadFly(t)
	fly := checkEnv(t, "fly.toml [env]", fc.Env, "FLY_PRIVATE_IP=fdaa:0:1:a7b:ab1:2c3d:4e5f:2", "FLY_MACHINE_ID=148e21ea7e3d89",
		"DATABASE_URL=postgres://broker:pw@claudemesh-db.flycast:5432/claudemesh", "CLUSTER_SECRET=0123456789abcdef0123456789abcdef")
	sixPN := netip.MustParsePrefix("fdaa::/16")
	for _, p := range trusted(t, "fly.toml", fly) {
		if p.Overlaps(sixPN) || p.Addr().Is6() {
			t.Errorf("fly.toml trusts %s: any machine of the organisation's 6PN network could name its own address", p)
		}
	}
	if fly.ClientIPHeader != clientaddr.HeaderFlyClientIP {
		t.Errorf("fly.toml reads %s; Fly's proxy puts its own address last in X-Forwarded-For, the client in Fly-Client-IP", fly.ClientIPHeader)
	}
	hookAndJoinDefaults(t, "fly.toml", fly)

	rw := checkEnv(t, "deploy/railway/variables.env", loadRailwayVariables(t), "CLUSTER_SECRET=0123456789abcdef0123456789abcdef")
	for _, p := range trusted(t, "railway", rw) {
		if p.Addr().Is6() || !p.Addr().IsPrivate() && !netip.MustParsePrefix("100.64.0.0/10").Contains(p.Addr()) {
			t.Errorf("railway trusts %s: want private IPv4 ranges only (the private network's IPv6 peers must not name clients)", p)
		}
	}
	if rw.ClientIPHeader != clientaddr.HeaderForwardedFor {
		t.Errorf("railway reads %s, want X-Forwarded-For", rw.ClientIPHeader)
	}
	hookAndJoinDefaults(t, "railway", rw)
}

// The compose file's HAProxy, run for real in front of nodes configured as
// compose configures them: each client is known by its own address (the
// audit log says so), and an X-Forwarded-For a client forges itself is not
// believed.
func TestHAProxyNamesEachClient(t *testing.T) {
	cc := loadComposeCluster(t)
	nodes := composeNodes(t, cc)
	first := nodes[cc.nodes[0]]
	base := startHAProxy(t, nodes)
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws"
	mesh := testkit.NewMesh(t, first.Store(), 2)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for ip, header := range map[string]http.Header{
		"127.0.0.31": nil,
		"127.0.0.32": {"X-Forwarded-For": {"203.0.113.9"}},
	} {
		c, err := client.Dial(ctx, wsURL, &client.DialOptions{HTTPClient: testkit.HTTPClientFrom(t, ip), Header: header})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		if _, err := c.Hello(ctx, mesh.Members[0], client.HelloOptions{}); err != nil {
			t.Fatalf("hello from %s through HAProxy: %v", ip, err)
		}
	}
	var got map[string]int
	testkit.Eventually(t, 10*time.Second, "both connections audited", func() bool {
		evs, err := first.Store().ListAudit(ctx, mesh.MeshID, store.EventPeerConnected, 10)
		if err != nil {
			t.Fatal(err)
		}
		got = map[string]int{}
		for _, e := range evs {
			r, _ := e.Metadata["remote"].(string)
			got[r]++
		}
		return len(evs) == 2
	})
	if got["127.0.0.31"] != 1 || got["127.0.0.32"] != 1 {
		t.Fatalf("peer_connected remotes through HAProxy: %v, want 127.0.0.31 and 127.0.0.32 (not HAProxy's 127.0.0.1, not the forged 203.0.113.9)", got)
	}
}
