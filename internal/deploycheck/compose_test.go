package deploycheck_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v3"

	"github.com/claudemesh/broker/internal/config"
)

// loadCompose loads docker-compose.yml with the loader Docker Compose
// itself uses (schema validation, anchors and merges, interpolation of the
// ${VAR:-default}s with nothing set but the required CLUSTER_SECRET), the
// monitoring profile enabled.
func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	opts, err := cli.NewProjectOptions([]string{repoPath("docker-compose.yml")},
		cli.WithWorkingDirectory(root), cli.WithEnv([]string{composeSecret}), cli.WithProfiles([]string{"monitoring"}))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	return p
}

func serviceEnv(s types.ServiceConfig) map[string]string {
	env := map[string]string{}
	for k, v := range s.Environment {
		if v != nil {
			env[k] = *v
		}
	}
	return env
}

// composeCluster is docker-compose.yml seen from the broker: which
// services run the broker image and with which configuration.
type composeCluster struct {
	p       *types.Project
	brokers map[string]*config.Config // services built from the Dockerfile
	nodes   []string                  // those that serve (the others are one-shot commands)
}

func loadComposeCluster(t *testing.T) composeCluster {
	t.Helper()
	cc := composeCluster{p: loadCompose(t), brokers: map[string]*config.Config{}}
	for name, s := range cc.p.Services {
		if s.Build == nil {
			continue
		}
		if s.Build.Context != root {
			t.Errorf("compose service %s builds %s, want the repository root", name, s.Build.Context)
		}
		cc.brokers[name] = checkEnv(t, "compose service "+name, serviceEnv(s))
		if len(s.Command) == 0 || slices.Equal(s.Command, []string{"serve"}) {
			cc.nodes = append(cc.nodes, name)
		}
	}
	slices.Sort(cc.nodes)
	return cc
}

// Every broker service's environment loads in the broker and joins the
// other nodes on their gossip ports; Postgres, the migration and the
// dependencies line up; only the load balancer (and, local only, the
// monitoring UIs) publish ports; every mounted file exists.
func TestComposeFile(t *testing.T) {
	cc := loadComposeCluster(t)
	p := cc.p
	if len(cc.nodes) != 3 {
		t.Fatalf("compose runs %d broker nodes (%v), want 3", len(cc.nodes), cc.nodes)
	}
	names := map[string]bool{}
	for _, n := range cc.nodes {
		cfg := cc.brokers[n]
		if names[cfg.NodeName] {
			t.Errorf("two nodes are named %s", cfg.NodeName)
		}
		names[cfg.NodeName] = true
		var joined []string
		for _, seed := range cfg.ClusterJoin {
			host, _, err := net.SplitHostPort(seed)
			if err != nil {
				t.Fatalf("%s: CLUSTER_JOIN entry %q: %v", n, seed, err)
			}
			target, ok := cc.brokers[host]
			if !ok || !slices.Contains(cc.nodes, host) {
				t.Errorf("%s: CLUSTER_JOIN names %s, which is not a broker node of the compose file", n, host)
				continue
			}
			if port(t, seed) != port(t, target.ClusterBind) {
				t.Errorf("%s: CLUSTER_JOIN %s, but %s gossips on %s", n, seed, host, target.ClusterBind)
			}
			joined = append(joined, host)
		}
		slices.Sort(joined)
		if !slices.Equal(joined, cc.nodes) {
			t.Errorf("%s joins %v, want every node %v", n, joined, cc.nodes)
		}
		if cfg.ClusterSecret == "" {
			t.Errorf("%s: gossip is not encrypted (CLUSTER_SECRET)", n)
		}
		if d := p.Services[n].DependsOn["migrate"]; d.Condition != types.ServiceConditionCompletedSuccessfully {
			t.Errorf("%s must wait for migrate to complete, depends_on = %+v", n, p.Services[n].DependsOn)
		}
	}

	pg, ok := p.Services["postgres"]
	if !ok || pg.HealthCheck == nil {
		t.Fatal("compose needs a postgres service with a health check")
	}
	pgEnv := serviceEnv(pg)
	for name, cfg := range cc.brokers {
		u, err := url.Parse(cfg.DatabaseURL)
		if err != nil {
			t.Fatalf("%s: DATABASE_URL: %v", name, err)
		}
		pw, _ := u.User.Password()
		if u.Hostname() != "postgres" || u.Port() != "5432" || u.User.Username() != pgEnv["POSTGRES_USER"] ||
			pw != pgEnv["POSTGRES_PASSWORD"] || strings.TrimPrefix(u.Path, "/") != pgEnv["POSTGRES_DB"] {
			t.Errorf("%s: DATABASE_URL %s does not match the postgres service %v", name, cfg.DatabaseURL, pgEnv)
		}
	}
	mig := p.Services["migrate"]
	if !slices.Equal(mig.Command, []string{"migrate"}) || mig.DependsOn["postgres"].Condition != types.ServiceConditionHealthy || mig.Restart != "no" {
		t.Errorf("migrate: command %v, depends_on %+v, restart %q; want a one-shot `migrate` once Postgres is healthy", mig.Command, mig.DependsOn, mig.Restart)
	}

	for name, s := range p.Services {
		for _, v := range s.Volumes {
			if v.Type != types.VolumeTypeBind {
				continue
			}
			if rel, err := filepath.Rel(root, v.Source); err != nil || strings.HasPrefix(rel, "..") {
				t.Errorf("%s mounts %s from outside the repository", name, v.Source)
			} else if _, err := os.Stat(v.Source); err != nil {
				t.Errorf("%s mounts %s, which does not exist", name, rel)
			}
		}
		if len(s.Ports) > 0 && name != "lb" && len(s.Profiles) == 0 {
			t.Errorf("%s publishes ports; only the load balancer should", name)
		}
	}
	for _, name := range []string{"prometheus", "grafana"} {
		s := p.Services[name]
		if !slices.Equal(s.Profiles, []string{"monitoring"}) {
			t.Errorf("%s is in profiles %v, want the optional monitoring profile", name, s.Profiles)
		}
		for _, pc := range s.Ports {
			if pc.HostIP != "127.0.0.1" {
				t.Errorf("%s publishes %s on all interfaces, want 127.0.0.1 only", name, pc.Published)
			}
		}
	}
}

// bindTarget returns where a service mounts the repository path rel, and
// whether it does.
func bindTarget(s types.ServiceConfig, rel string) (string, bool) {
	for _, v := range s.Volumes {
		if v.Type == types.VolumeTypeBind && v.Source == repoPath(rel) {
			return v.Target, true
		}
	}
	return "", false
}

// haproxyConfig is what the checks need from deploy/compose/haproxy.cfg.
type haproxyConfig struct {
	bind      string            // the frontend's bind address
	servers   map[string]string // server name → address
	checkPath string            // the http-check uri
}

func parseHAProxy(t *testing.T, data []byte) haproxyConfig {
	t.Helper()
	hc := haproxyConfig{servers: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch {
		case f[0] == "bind" && len(f) >= 2:
			hc.bind = f[1]
		case f[0] == "server" && len(f) >= 3:
			hc.servers[f[1]] = f[2]
		case f[0] == "http-check" && len(f) >= 2 && f[1] == "send":
			if i := slices.Index(f, "uri"); i > 0 && i+1 < len(f) {
				hc.checkPath = f[i+1]
			}
		}
	}
	if hc.bind == "" || len(hc.servers) == 0 || hc.checkPath == "" {
		t.Fatalf("haproxy.cfg: bind %q, servers %v, check %q: incomplete", hc.bind, hc.servers, hc.checkPath)
	}
	return hc
}

// The load balancer's config file is the one compose mounts where the
// image reads it; it listens on the published port and has one server per
// broker node at the node's HTTP port, health-checked on a path the broker
// serves. HAProxy itself accepts the file.
func TestComposeLoadBalancer(t *testing.T) {
	cc := loadComposeCluster(t)
	lb := cc.p.Services["lb"]
	if target, ok := bindTarget(lb, "deploy/compose/haproxy.cfg"); !ok || target != "/usr/local/etc/haproxy/haproxy.cfg" {
		t.Fatalf("lb mounts haproxy.cfg at %q, want the image's /usr/local/etc/haproxy/haproxy.cfg", target)
	}
	hc := parseHAProxy(t, readRepoFile(t, "deploy/compose/haproxy.cfg"))
	if len(lb.Ports) != 1 || int(lb.Ports[0].Target) != port(t, hc.bind) {
		t.Errorf("lb publishes %+v, want one port to HAProxy's %s", lb.Ports, hc.bind)
	}
	var servers []string
	for name, addr := range hc.servers {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("haproxy server %s %s: %v", name, addr, err)
		}
		cfg, ok := cc.brokers[host]
		if !ok || port(t, addr) != cfg.Port {
			t.Errorf("haproxy server %s %s is not a broker node at its BROKER_PORT", name, addr)
			continue
		}
		servers = append(servers, host)
	}
	slices.Sort(servers)
	if !slices.Equal(servers, cc.nodes) {
		t.Errorf("haproxy balances %v, want every node %v", servers, cc.nodes)
	}
	for _, n := range cc.nodes {
		if !slices.Contains(lb.GetDependencies(), n) {
			t.Errorf("lb does not depend on %s", n)
		}
	}
	haproxy := tool(t, "haproxy", "haproxy")
	if code, out, errOut := run(t, []string{haproxy, "-c", "-f", repoPath("deploy/compose/haproxy.cfg")}, nil); code != 0 {
		t.Fatalf("haproxy -c rejects haproxy.cfg:\n%s%s", out, errOut)
	}
}

// prometheusConfig is what the checks need from prometheus.yml.
type prometheusConfig struct {
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName       string `yaml:"job_name"`
		MetricsPath   string `yaml:"metrics_path"`
		StaticConfigs []struct {
			Targets []string `yaml:"targets"`
		} `yaml:"static_configs"`
	} `yaml:"scrape_configs"`
}

func loadPrometheus(t *testing.T) prometheusConfig {
	t.Helper()
	var pc prometheusConfig
	if err := yaml.Unmarshal(readRepoFile(t, "deploy/prometheus/prometheus.yml"), &pc); err != nil {
		t.Fatal(err)
	}
	return pc
}

// flagValue returns the value of --name=value in a command.
func flagValue(cmd []string, name string) string {
	for _, a := range cmd {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// The monitoring profile: Prometheus reads the repository's config where
// compose mounts it and scrapes every node's /metrics directly; Grafana's
// provisioning points at that Prometheus and loads the dashboard folder
// compose mounts, and the dashboard uses the provisioned datasource.
func TestComposeMonitoring(t *testing.T) {
	cc := loadComposeCluster(t)
	prom := cc.p.Services["prometheus"]
	confDir, ok := bindTarget(prom, "deploy/prometheus")
	if !ok || flagValue(prom.Command, "config.file") != confDir+"/prometheus.yml" {
		t.Fatalf("prometheus: config %q, mounted at %q: want deploy/prometheus/prometheus.yml", flagValue(prom.Command, "config.file"), confDir)
	}
	promPort := port(t, flagValue(prom.Command, "web.listen-address"))
	pc := loadPrometheus(t)
	for _, rf := range pc.RuleFiles {
		if _, err := os.Stat(repoPath("deploy/prometheus/" + rf)); err != nil {
			t.Errorf("prometheus.yml loads %s: %v", rf, err)
		}
	}
	if len(pc.ScrapeConfigs) != 1 || pc.ScrapeConfigs[0].JobName != "claudemesh" {
		t.Fatalf("prometheus.yml: want one scrape job claudemesh (the alerts use it), got %+v", pc.ScrapeConfigs)
	}
	sc := pc.ScrapeConfigs[0]
	var scraped []string
	for _, st := range sc.StaticConfigs {
		for _, target := range st.Targets {
			host, _, _ := net.SplitHostPort(target)
			if cfg, ok := cc.brokers[host]; !ok || port(t, target) != cfg.Port {
				t.Errorf("prometheus scrapes %s, which is not a broker node at its BROKER_PORT", target)
				continue
			}
			scraped = append(scraped, host)
		}
	}
	slices.Sort(scraped)
	if !slices.Equal(scraped, cc.nodes) {
		t.Errorf("prometheus scrapes %v, want every node %v", scraped, cc.nodes)
	}

	graf := cc.p.Services["grafana"]
	provDir, ok1 := bindTarget(graf, "deploy/grafana/provisioning")
	dashDir, ok2 := bindTarget(graf, "deploy/grafana/dashboards")
	if !ok1 || provDir != "/etc/grafana/provisioning" || !ok2 {
		t.Fatalf("grafana mounts provisioning at %q and dashboards at %q", provDir, dashDir)
	}
	if home := serviceEnv(graf)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]; home != dashDir+"/claudemesh.json" {
		t.Errorf("grafana's home dashboard %q is not the mounted claudemesh.json", home)
	}
	var ds struct {
		Datasources []struct{ Name, UID, Type, URL string } `yaml:"datasources"`
	}
	if err := yaml.Unmarshal(readRepoFile(t, "deploy/grafana/provisioning/datasources/prometheus.yml"), &ds); err != nil {
		t.Fatal(err)
	}
	if len(ds.Datasources) != 1 || ds.Datasources[0].Type != "prometheus" {
		t.Fatalf("grafana datasources: %+v", ds.Datasources)
	}
	u, err := url.Parse(ds.Datasources[0].URL)
	if err != nil || u.Hostname() != "prometheus" || u.Port() != strconv.Itoa(promPort) {
		t.Errorf("grafana's datasource %s is not the prometheus service on :%d", ds.Datasources[0].URL, promPort)
	}
	var prov struct {
		Providers []struct {
			Type    string
			Options struct{ Path string }
		} `yaml:"providers"`
	}
	if err := yaml.Unmarshal(readRepoFile(t, "deploy/grafana/provisioning/dashboards/claudemesh.yml"), &prov); err != nil {
		t.Fatal(err)
	}
	if len(prov.Providers) != 1 || prov.Providers[0].Type != "file" || prov.Providers[0].Options.Path != dashDir {
		t.Errorf("grafana's dashboard provider %+v does not load %s", prov.Providers, dashDir)
	}
	var dash struct {
		Panels []struct {
			Datasource struct{ UID string }
			Targets    []struct{ Datasource struct{ UID string } }
		}
	}
	if err := json.Unmarshal(readRepoFile(t, "deploy/grafana/dashboards/claudemesh.json"), &dash); err != nil {
		t.Fatal(err)
	}
	for i, p := range dash.Panels {
		uids := []string{p.Datasource.UID}
		for _, tg := range p.Targets {
			uids = append(uids, tg.Datasource.UID)
		}
		for _, uid := range uids {
			if uid != "" && uid != ds.Datasources[0].UID {
				t.Errorf("panel %d uses datasource %q, not the provisioned %q", i, uid, ds.Datasources[0].UID)
			}
		}
	}
}
