package config_test

import (
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/config"
)

// Gossip beyond loopback needs CLUSTER_SECRET (or an explicit
// CLUSTER_INSECURE); the refusal names the variable.
func TestRequireGossipSecret(t *testing.T) {
	for _, tc := range []struct {
		env []string
		ok  bool
	}{
		{[]string{}, false}, // the default, :7946, is every interface
		{[]string{"CLUSTER_BIND=0.0.0.0:7946"}, false},
		{[]string{"CLUSTER_BIND=[::]:7946", "CLUSTER_ADVERTISE=[fd00::1]:7946"}, false},
		{[]string{"CLUSTER_BIND=10.0.0.5:7946"}, false},
		{[]string{"CLUSTER_BIND=127.0.0.1:7946"}, true},
		{[]string{"CLUSTER_BIND=127.0.0.9:0"}, true},
		{[]string{"CLUSTER_BIND=[::1]:7946"}, true},
		{[]string{"CLUSTER_SECRET=0123456789abcdef0123"}, true},
		{[]string{"CLUSTER_INSECURE=true"}, true},
		{[]string{"CLUSTER_INSECURE=false", "CLUSTER_BIND=0.0.0.0:7946"}, false},
	} {
		c, err := config.LoadFrom(append([]string{"DATABASE_URL=postgres://x/y"}, tc.env...))
		if err != nil {
			t.Fatalf("%v: %v", tc.env, err)
		}
		err = c.RequireGossipSecret()
		if (err == nil) != tc.ok {
			t.Errorf("%v: RequireGossipSecret() = %v, want ok=%v", tc.env, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "CLUSTER_SECRET") {
			t.Errorf("%v: the refusal does not name CLUSTER_SECRET: %v", tc.env, err)
		}
	}
}

func TestBoundsDefaults(t *testing.T) {
	c, err := config.LoadFrom([]string{"DATABASE_URL=postgres://x/y"})
	if err != nil {
		t.Fatal(err)
	}
	if c.SendQueueBytes != 4<<20 || c.MaxSessionsPerMember != 32 || c.ClusterInsecure {
		t.Fatalf("defaults: SEND_QUEUE_BYTES %d MAX_SESSIONS_PER_MEMBER %d CLUSTER_INSECURE %v",
			c.SendQueueBytes, c.MaxSessionsPerMember, c.ClusterInsecure)
	}
	// Larger frames get a larger default budget: two of them always fit
	// besides the room kept for replies.
	c, err = config.LoadFrom([]string{"MAX_MESSAGE_BYTES=16777216"})
	if err != nil {
		t.Fatal(err)
	}
	if c.SendQueueBytes < config.MinSendQueueBytes(16<<20) {
		t.Fatalf("SEND_QUEUE_BYTES %d for 16 MiB frames", c.SendQueueBytes)
	}
	_, err = config.LoadFrom([]string{"SEND_QUEUE_BYTES=1000", "MAX_SESSIONS_PER_MEMBER=-1", "NODE_NAME=" + strings.Repeat("n", 129)})
	for _, v := range []string{"SEND_QUEUE_BYTES", "MAX_SESSIONS_PER_MEMBER", "NODE_NAME"} {
		if err == nil || !strings.Contains(err.Error(), "config: "+v+":") {
			t.Errorf("no line for %s in %v", v, err)
		}
	}
}
