package deploycheck_test

import (
	"bufio"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// railwayConfig is deploy/railway/railway.json, decoded strictly.
type railwayConfig struct {
	Schema string `json:"$schema"`
	Build  struct {
		Builder        string   `json:"builder"`
		DockerfilePath string   `json:"dockerfilePath"`
		WatchPatterns  []string `json:"watchPatterns"`
	} `json:"build"`
	Deploy struct {
		StartCommand            string   `json:"startCommand"`
		PreDeployCommand        []string `json:"preDeployCommand"`
		NumReplicas             int      `json:"numReplicas"`
		HealthcheckPath         string   `json:"healthcheckPath"`
		HealthcheckTimeout      int      `json:"healthcheckTimeout"`
		RestartPolicyType       string   `json:"restartPolicyType"`
		RestartPolicyMaxRetries int      `json:"restartPolicyMaxRetries"`
		OverlapSeconds          int      `json:"overlapSeconds"`
		DrainingSeconds         int      `json:"drainingSeconds"`
	} `json:"deploy"`
}

func loadRailway(t *testing.T) railwayConfig {
	t.Helper()
	var rc railwayConfig
	dec := json.NewDecoder(bytesReader(readRepoFile(t, "deploy/railway/railway.json")))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rc); err != nil {
		t.Fatalf("deploy/railway/railway.json: %v", err)
	}
	return rc
}

// railwayRefs stand in for the ${{...}} references Railway resolves.
var railwayRefs = strings.NewReplacer(
	"${{Postgres.DATABASE_URL}}", "postgresql://postgres:pw@postgres.railway.internal:5432/railway",
	"${{RAILWAY_PRIVATE_DOMAIN}}", "broker.railway.internal",
	"${{RAILWAY_PUBLIC_DOMAIN}}", "broker-production.up.railway.app",
	"${{RAILWAY_GIT_COMMIT_SHA}}", "9f2c1e0",
)

// loadRailwayVariables reads variables.env (KEY=VALUE lines) with the
// references resolved.
func loadRailwayVariables(t *testing.T) map[string]string {
	t.Helper()
	env := map[string]string{}
	sc := bufio.NewScanner(bytesReader(readRepoFile(t, "deploy/railway/variables.env")))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("variables.env: %q is not KEY=VALUE", line)
		}
		v = railwayRefs.Replace(v)
		if strings.Contains(v, "${{") {
			t.Fatalf("variables.env: %s=%s uses a reference this test does not know", k, v)
		}
		env[k] = v
	}
	return env
}

// The Railway service builds the repository's Dockerfile, runs several
// replicas, health-checks a path the broker serves and migrates before
// deploying; its variables load in the broker and make the replicas gossip
// over the private network on the gossip port.
func TestRailwayConfig(t *testing.T) {
	rc := loadRailway(t)
	if rc.Build.Builder != "DOCKERFILE" {
		t.Errorf("builder %q, want DOCKERFILE", rc.Build.Builder)
	}
	if _, err := os.Stat(repoPath(rc.Build.DockerfilePath)); err != nil {
		t.Errorf("dockerfilePath %q: %v", rc.Build.DockerfilePath, err)
	}
	if rc.Deploy.NumReplicas < 2 || rc.Deploy.HealthcheckPath != "/health" || len(rc.Deploy.PreDeployCommand) == 0 {
		t.Errorf("deploy = %+v; want 2+ replicas, /health, a pre-deploy migration", rc.Deploy)
	}
	if rc.Deploy.StartCommand != "" {
		t.Errorf("startCommand %q replaces the image's entrypoint; the image's ENTRYPOINT and CMD already serve", rc.Deploy.StartCommand)
	}
	env := loadRailwayVariables(t)
	for _, secret := range []string{"CLUSTER_SECRET", "ADMIN_TOKEN"} {
		if _, ok := env[secret]; ok {
			t.Errorf("variables.env sets %s; secrets are set apart", secret)
		}
	}
	cfg := checkEnv(t, "deploy/railway/variables.env", env, "CLUSTER_SECRET=0123456789abcdef0123456789abcdef")
	if len(cfg.ClusterJoin) != 1 || cfg.ClusterJoin[0] != "broker.railway.internal:"+portString(t, cfg.ClusterBind) {
		t.Errorf("CLUSTER_JOIN = %v, want the service's private domain on the gossip port %s", cfg.ClusterJoin, cfg.ClusterBind)
	}
	if !strings.HasPrefix(cfg.PublicURL, "wss://") || !strings.HasSuffix(cfg.PublicURL, "/ws") {
		t.Errorf("PUBLIC_URL = %s", cfg.PublicURL)
	}
}
