package deploycheck_test

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
)

// composeSecret is what an operator exports before `docker compose up`.
const composeSecret = "CLUSTER_SECRET=an-operator-chosen-secret-0123456789"

// docker-compose.yml ships no gossip key: without CLUSTER_SECRET Compose
// refuses to start, naming it, and the key the nodes get is the one the
// operator set.
func TestComposeRequiresClusterSecret(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{repoPath("docker-compose.yml")},
		cli.WithWorkingDirectory(root), cli.WithEnv([]string{}), cli.WithProfiles([]string{"monitoring"}))
	if err != nil {
		t.Fatal(err)
	}
	_, err = opts.LoadProject(context.Background())
	if err == nil || !strings.Contains(err.Error(), "CLUSTER_SECRET") {
		t.Fatalf("docker-compose.yml loads without CLUSTER_SECRET (err %v)", err)
	}
	raw, err := os.ReadFile(repoPath("docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`CLUSTER_SECRET:[^\n]*:-`).Find(raw); m != nil {
		t.Fatalf("docker-compose.yml has a default gossip key: %s", m)
	}
	cc := loadComposeCluster(t)
	want := strings.TrimPrefix(composeSecret, "CLUSTER_SECRET=")
	for _, n := range cc.nodes {
		if got := cc.brokers[n].ClusterSecret; got != want {
			t.Errorf("%s gets CLUSTER_SECRET %q, want the operator's", n, got)
		}
		if err := cc.brokers[n].RequireGossipSecret(); err != nil {
			t.Errorf("%s would refuse to start: %v", n, err)
		}
	}
}

// Fly and Railway gossip on a private network other tenants share (on Fly
// the whole organisation's): there a node without CLUSTER_SECRET refuses
// to start, and each guide sets it as a secret, never in a file.
func TestCloudGuidesSetClusterSecret(t *testing.T) {
	fly := checkEnv(t, "fly.toml [env]", loadFly(t).Env, "FLY_PRIVATE_IP=fdaa:0:1:a7b:ab1:2c3d:4e5f:2",
		"FLY_MACHINE_ID=148e21ea7e3d89", "DATABASE_URL=postgres://broker:pw@claudemesh-db.flycast:5432/claudemesh")
	railway := checkEnv(t, "deploy/railway/variables.env", loadRailwayVariables(t))
	for name, cfg := range map[string]interface{ RequireGossipSecret() error }{"fly": fly, "railway": railway} {
		if err := cfg.RequireGossipSecret(); err == nil {
			t.Errorf("%s: a node without CLUSTER_SECRET would start", name)
		}
	}
	for guide, want := range map[string]*regexp.Regexp{
		"deploy/fly/README.md":     regexp.MustCompile(`fly secrets set[^\n]*(\\\n[^\n]*)*CLUSTER_SECRET=\$\(openssl rand -hex 32\)`),
		"deploy/railway/README.md": regexp.MustCompile(`railway variables --set "CLUSTER_SECRET=\$\(openssl rand -hex 32\)"`),
	} {
		if !want.Match(readRepoFile(t, guide)) {
			t.Errorf("%s does not set CLUSTER_SECRET as a secret (%s)", guide, want)
		}
	}
}
