package config_test

import (
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/config"
)

func TestDefaults(t *testing.T) {
	c, err := config.LoadFrom([]string{"DATABASE_URL=postgres://x/y"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 7900 || c.StatusTTLSeconds != 60 || c.HookFreshSeconds != 30 || c.MaxConnsPerMesh != 100 ||
		c.MaxMessageBytes != 65536 || c.HookRateLimitPerMin != 30 || c.PresenceGrace != 90 || c.MessageTTL != 168*time.Hour ||
		!c.RequireHookSignature() || c.ClusterBind != ":7946" || c.ClusterProfile != "lan" {
		t.Fatalf("defaults: %+v", c)
	}
	// A Config literal gets the same defaults from Normalize.
	var lit config.Config
	lit.Normalize()
	if lit.Port != 7900 || !lit.RequireHookSignature() || lit.LeaseDuration != 30*time.Second {
		t.Fatalf("zero-value defaults: %+v", lit)
	}
}

// Every bad variable is reported, one line each, naming the variable.
func TestErrorsOnePerLine(t *testing.T) {
	_, err := config.LoadFrom([]string{
		"BROKER_PORT=abc", "MESSAGE_TTL=soon",
	})
	if err == nil {
		t.Fatal("want an error")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "BROKER_PORT") || !strings.Contains(lines[1], "MESSAGE_TTL") {
		t.Fatalf("got %q", err)
	}
	_, err = config.LoadFrom([]string{"CLUSTER_PROFILE=moon", "LOG_LEVEL=loud", "MAX_MESSAGE_BYTES=10",
		"HOOK_REQUIRE_SIGNATURE=maybe", "CLUSTER_BIND=[::]:7946", "CLUSTER_SECRET=short"})
	if err == nil {
		t.Fatal("want an error")
	}
	for _, v := range []string{"CLUSTER_PROFILE", "LOG_LEVEL", "MAX_MESSAGE_BYTES", "HOOK_REQUIRE_SIGNATURE", "CLUSTER_ADVERTISE", "CLUSTER_SECRET"} {
		if !strings.Contains(err.Error(), "config: "+v+":") {
			t.Errorf("no line for %s in %q", v, err)
		}
	}
	if n := strings.Count(err.Error(), "\n") + 1; n != 6 {
		t.Errorf("%d lines, want 6: %q", n, err)
	}
}

func TestFlyDefaults(t *testing.T) {
	c, err := config.LoadFrom([]string{"FLY_PRIVATE_IP=fdaa:0:1::3", "FLY_MACHINE_ID=e784079b"})
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "e784079b" || c.ClusterBind != "[::]:7946" || c.ClusterAdvertise != "[fdaa:0:1::3]:7946" {
		t.Fatalf("fly: %+v", c)
	}
}

func TestRequireDatabase(t *testing.T) {
	c, err := config.LoadFrom([]string{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.RequireDatabase(); err == nil || !strings.Contains(err.Error(), "DATABASE_URL") {
		t.Fatalf("got %v", err)
	}
}

// Invites carry PUBLIC_URL; without it, the node's own address. A value
// peers could not dial is refused where it enters.
func TestInviteURL(t *testing.T) {
	env := func(kv ...string) func(string) string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	for _, c := range []struct {
		env      func(string) string
		want     string
		explicit bool
	}{
		{env(), "ws://localhost:7900/ws", false},
		{env("BROKER_PORT", "7901", "BROKER_HOST", "127.0.0.1"), "ws://127.0.0.1:7901/ws", false},
		{env("BROKER_HOST", "::"), "ws://localhost:7900/ws", false},
		{env("PUBLIC_URL", "wss://mesh.example/ws", "BROKER_PORT", "7901"), "wss://mesh.example/ws", true},
	} {
		got, explicit, err := config.InviteURL(c.env)
		if err != nil || got != c.want || explicit != c.explicit {
			t.Errorf("InviteURL = %q, %v, %v; want %q, %v", got, explicit, err, c.want, c.explicit)
		}
	}
	for _, bad := range []string{"http://x/ws", "ws://", "ws:///ws", "localhost:7800", "ws://%zz/ws"} {
		if _, _, err := config.InviteURL(env("PUBLIC_URL", bad)); err == nil || !strings.Contains(err.Error(), "PUBLIC_URL") {
			t.Errorf("PUBLIC_URL=%q: err %v, want a PUBLIC_URL error", bad, err)
		}
		if _, err := config.LoadFrom([]string{"PUBLIC_URL=" + bad}); err == nil {
			t.Errorf("LoadFrom accepted PUBLIC_URL=%q", bad)
		}
	}
	if _, _, err := config.InviteURL(env("BROKER_PORT", "http")); err == nil {
		t.Error("a bad BROKER_PORT was accepted")
	}
}
