package deploycheck_test

import (
	"net/url"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// flyConfig is the part of fly.toml the checks read. Decoding is strict:
// a key this struct does not know fails the test, so a typo cannot hide.
type flyConfig struct {
	App           string            `toml:"app"`
	PrimaryRegion string            `toml:"primary_region"`
	KillSignal    string            `toml:"kill_signal"`
	KillTimeout   string            `toml:"kill_timeout"`
	Env           map[string]string `toml:"env"`
	Deploy        struct {
		ReleaseCommand string `toml:"release_command"`
		Strategy       string `toml:"strategy"`
	} `toml:"deploy"`
	HTTPService struct {
		InternalPort       int    `toml:"internal_port"`
		ForceHTTPS         bool   `toml:"force_https"`
		AutoStopMachines   string `toml:"auto_stop_machines"`
		AutoStartMachines  bool   `toml:"auto_start_machines"`
		MinMachinesRunning int    `toml:"min_machines_running"`
		Concurrency        struct {
			Type      string `toml:"type"`
			SoftLimit int    `toml:"soft_limit"`
			HardLimit int    `toml:"hard_limit"`
		} `toml:"concurrency"`
		Checks []struct {
			Method      string `toml:"method"`
			Path        string `toml:"path"`
			Interval    string `toml:"interval"`
			Timeout     string `toml:"timeout"`
			GracePeriod string `toml:"grace_period"`
		} `toml:"checks"`
	} `toml:"http_service"`
	Metrics struct {
		Port int    `toml:"port"`
		Path string `toml:"path"`
	} `toml:"metrics"`
	VM []struct {
		Size   string `toml:"size"`
		Memory string `toml:"memory"`
	} `toml:"vm"`
}

func loadFly(t *testing.T) flyConfig {
	t.Helper()
	var fc flyConfig
	dec := toml.NewDecoder(bytesReader(readRepoFile(t, "deploy/fly/fly.toml")))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fc); err != nil {
		t.Fatalf("deploy/fly/fly.toml: %v", err)
	}
	return fc
}

func flyDuration(t *testing.T, what, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("fly.toml %s = %q: %v", what, s, err)
	}
	return d
}

// fly.toml's environment, with what Fly sets in every machine, loads in the
// broker and gives gossip over 6PN: bind [::], advertise the machine's
// private IPv6, node name = machine id, join <app>.internal on the gossip
// port, WAN timings. Secrets stay out of the file; the HTTP service,
// checks and metrics use the broker's port and paths; machines are not
// stopped under WebSockets and get time to drain.
func TestFlyConfig(t *testing.T) {
	fc := loadFly(t)
	if fc.App == "" || fc.PrimaryRegion == "" {
		t.Fatal("fly.toml needs app and primary_region")
	}
	for _, secret := range []string{"DATABASE_URL", "CLUSTER_SECRET", "ADMIN_TOKEN"} {
		if _, ok := fc.Env[secret]; ok {
			t.Errorf("fly.toml [env] sets %s: it is a secret (fly secrets set)", secret)
		}
	}
	cfg := checkEnv(t, "fly.toml [env]", fc.Env,
		"FLY_PRIVATE_IP=fdaa:0:1:a7b:ab1:2c3d:4e5f:2", "FLY_MACHINE_ID=148e21ea7e3d89",
		"DATABASE_URL=postgres://broker:pw@claudemesh-db.flycast:5432/claudemesh", "CLUSTER_SECRET=0123456789abcdef0123456789abcdef")
	if cfg.ClusterBind != "[::]:7946" || cfg.ClusterAdvertise != "[fdaa:0:1:a7b:ab1:2c3d:4e5f:2]:7946" || cfg.NodeName != "148e21ea7e3d89" {
		t.Errorf("on Fly the broker binds %s, advertises %s as %s; want [::]:7946, the 6PN address, the machine id",
			cfg.ClusterBind, cfg.ClusterAdvertise, cfg.NodeName)
	}
	if want := fc.App + ".internal:" + strconv.Itoa(port(t, cfg.ClusterBind)); !slices.Equal(cfg.ClusterJoin, []string{want}) {
		t.Errorf("CLUSTER_JOIN = %v, want %s", cfg.ClusterJoin, want)
	}
	if cfg.ClusterProfile != "wan" {
		t.Errorf("CLUSTER_PROFILE = %s, want wan across regions", cfg.ClusterProfile)
	}
	if u, err := url.Parse(cfg.PublicURL); err != nil || u.Scheme != "wss" || u.Host != fc.App+".fly.dev" || u.Path != "/ws" {
		t.Errorf("PUBLIC_URL = %s, want wss://%s.fly.dev/ws", cfg.PublicURL, fc.App)
	}

	hs := fc.HTTPService
	metricsPort := cfg.Port
	if cfg.MetricsAddr != "" {
		metricsPort = port(t, cfg.MetricsAddr)
	}
	if hs.InternalPort != cfg.Port || fc.Metrics.Port != metricsPort {
		t.Errorf("internal_port %d, metrics port %d; the broker listens on %d, metrics on %d", hs.InternalPort, fc.Metrics.Port, cfg.Port, metricsPort)
	}
	if cfg.MetricsAddr == "" {
		t.Errorf("METRICS_ADDR unset: Fly's public proxy would expose /metrics")
	}
	if len(hs.Checks) == 0 || hs.Checks[0].Path != "/health" || hs.Checks[0].Method != "GET" {
		t.Errorf("http_service.checks = %+v, want GET /health", hs.Checks)
	}
	for _, c := range hs.Checks {
		if flyDuration(t, "check timeout", c.Timeout) >= flyDuration(t, "check interval", c.Interval) {
			t.Errorf("check %s: timeout %s is not shorter than its interval %s", c.Path, c.Timeout, c.Interval)
		}
	}
	if hs.AutoStopMachines != "off" || hs.MinMachinesRunning < 2 || hs.Concurrency.Type != "connections" {
		t.Errorf("http_service: auto_stop %q, min running %d, concurrency %q; want machines kept up, 2+, counted in connections",
			hs.AutoStopMachines, hs.MinMachinesRunning, hs.Concurrency.Type)
	}
	if fc.KillSignal != "SIGTERM" || flyDuration(t, "kill_timeout", fc.KillTimeout) <= cfg.ShutdownTimeout {
		t.Errorf("kill %s after %s; the broker drains on SIGTERM for up to SHUTDOWN_TIMEOUT %s", fc.KillSignal, fc.KillTimeout, cfg.ShutdownTimeout)
	}
	if fc.Deploy.ReleaseCommand == "" {
		t.Error("fly.toml has no release_command (migrations)")
	}
}
