package deploycheck_test

import (
	"context"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// Every HTTP path the deployment files point at (health checks, metrics
// scrapes, the public WebSocket URL) is served by a real node.
func TestReferencedHTTPPathsExist(t *testing.T) {
	refs := map[string][]string{} // path → where it is used
	use := func(path, where string) {
		if path == "" {
			t.Errorf("%s: no path", where)
			return
		}
		refs[path] = append(refs[path], where)
	}
	publicPath := func(where, publicURL string) {
		u, err := url.Parse(publicURL)
		if err != nil {
			t.Fatalf("%s: PUBLIC_URL %q: %v", where, publicURL, err)
		}
		use(u.Path, where+" PUBLIC_URL")
	}

	use(parseHAProxy(t, readRepoFile(t, "deploy/compose/haproxy.cfg")).checkPath, "haproxy.cfg http-check")
	for _, sc := range loadPrometheus(t).ScrapeConfigs {
		use(sc.MetricsPath, "prometheus.yml job "+sc.JobName)
	}
	cc := loadComposeCluster(t)
	for _, name := range cc.nodes {
		publicPath("compose "+name, cc.brokers[name].PublicURL)
	}
	fc := loadFly(t)
	for _, c := range fc.HTTPService.Checks {
		use(c.Path, "fly.toml http_service.checks")
	}
	use(fc.Metrics.Path, "fly.toml [metrics]")
	publicPath("fly.toml", fc.Env["PUBLIC_URL"])
	use(loadRailway(t).Deploy.HealthcheckPath, "railway.json healthcheckPath")
	publicPath("railway variables.env", loadRailwayVariables(t)["PUBLIC_URL"])

	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) { c.AdminToken = "paths-test-token" }})
	for path, where := range refs {
		if path == "/ws" {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := client.Dial(ctx, "ws://"+n.Addr()+path, nil)
			cancel()
			if err != nil {
				t.Errorf("%s (used by %v): not a WebSocket endpoint: %v", path, where, err)
				continue
			}
			_ = c.CloseNow()
			continue
		}
		resp, err := http.Get(n.HTTPURL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s (used by %v) = %d, want 200", path, where, resp.StatusCode)
		}
	}
	if len(refs) < 3 {
		t.Fatalf("found only the paths %v", refs)
	}
}
