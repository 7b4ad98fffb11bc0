package config_test

import (
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/config"
)

// The client-address, local-hook, join-proof and operator-endpoint
// variables: their defaults are the safe ones, and each bad value is
// reported on its own line.
func TestEdgeVariables(t *testing.T) {
	c, err := config.LoadFrom([]string{})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.TrustedProxies) != 0 || c.ClientIPHeader != "X-Forwarded-For" || c.ProxyProtocol || c.PendingPerAddr != 64 ||
		c.HookLocalAddr != "" || !c.RequireJoinProof() || c.MetricsToken != "" || c.PProf || c.HTTPReadTimeout != 10*time.Second {
		t.Fatalf("defaults: %+v", c)
	}
	var lit config.Config
	lit.Normalize()
	if !lit.RequireJoinProof() || lit.PendingPerAddr != 64 || lit.HTTPReadTimeout != 10*time.Second {
		t.Fatalf("zero-value defaults: %+v", lit)
	}

	c, err = config.LoadFrom([]string{"TRUSTED_PROXIES=172.16.0.0/12, 127.0.0.1", "CLIENT_IP_HEADER=fly-client-ip",
		"PROXY_PROTOCOL=true", "HOOK_LOCAL_ADDR=127.0.0.1:7899", "JOIN_REQUIRE_PROOF=false", "METRICS_ADDR=[::]:9091",
		"PPROF=true", "METRICS_TOKEN=0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.TrustedProxies) != 2 || c.RequireJoinProof() || !c.PProf {
		t.Fatalf("parsed: %+v", c)
	}

	_, err = config.LoadFrom([]string{"TRUSTED_PROXIES=0.0.0.0/0", "CLIENT_IP_HEADER=X-Real-IP", "PROXY_PROTOCOL=true",
		"MAX_PENDING_CONNECTIONS_PER_ADDR=-1", "HOOK_LOCAL_ADDR=0.0.0.0:7899", "JOIN_REQUIRE_PROOF=sometimes",
		"METRICS_TOKEN=short", "PPROF=true", "HTTP_READ_TIMEOUT=1ms"})
	if err == nil {
		t.Fatal("want an error")
	}
	for _, v := range []string{"TRUSTED_PROXIES", "CLIENT_IP_HEADER", "PROXY_PROTOCOL", "MAX_PENDING_CONNECTIONS_PER_ADDR",
		"HOOK_LOCAL_ADDR", "JOIN_REQUIRE_PROOF", "METRICS_TOKEN", "PPROF", "HTTP_READ_TIMEOUT"} {
		if !strings.Contains(err.Error(), "config: "+v+":") {
			t.Errorf("no line for %s in %q", v, err)
		}
	}
	for _, ok := range []string{"127.0.0.1:0", "[::1]:7899", "localhost:7899", "127.0.0.2:1"} {
		if _, err := config.LoadFrom([]string{"HOOK_LOCAL_ADDR=" + ok}); err != nil {
			t.Errorf("HOOK_LOCAL_ADDR=%s refused: %v", ok, err)
		}
	}
	for _, bad := range []string{":7899", "[::]:7899", "10.0.0.1:7899", "example.com:7899"} {
		if _, err := config.LoadFrom([]string{"HOOK_LOCAL_ADDR=" + bad}); err == nil {
			t.Errorf("HOOK_LOCAL_ADDR=%s accepted: it would take unsigned hooks from the network", bad)
		}
	}
}
