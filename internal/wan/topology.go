// Package wan runs a broker cluster spread over simulated regions on one
// machine, and measures what a far region costs.
//
// Each region has its own loopback address (127.0.10.1, 127.0.20.1, …) and
// one broker node, started in-process by internal/node. The network between
// regions is simulated in-process, because the test kernel has no sch_netem:
//
//   - every node reaches Postgres through a Proxy that delays each direction
//     of its TCP streams by the one-way delay between the node's region and
//     Postgres' region (and models the TCP handshake: a new connection's
//     first byte arrives three one-way delays after the dial);
//   - gossip goes through a DelayTransport, which delays each packet, and
//     each direction of each stream the node dials, by the one-way delay to
//     the destination's region;
//   - peers connect to the node of their region, directly or through a
//     Proxy with the peer↔node delay.
//
// Cluster starts such a cluster; the scenarios (Measure…) produce the rows
// of the table in docs/DEPLOY.md ("What a far region costs"), each next to
// what the wire allows (Wire) and to the target of issue 14 (Threshold).
package wan

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"time"
)

// Region is one simulated region: a name and the loopback address its
// node, its proxies and its peers use.
type Region struct {
	Name string
	IP   string
}

// Topology is the simulated network: regions, the one-way delay between
// each pair, where Postgres runs, and how far peers are from their node.
type Topology struct {
	Regions []Region
	// OneWay holds the one-way delay of each pair of regions, keyed by
	// pairKey; a missing pair means no delay.
	OneWay map[string]time.Duration
	// Postgres is the region hosting Postgres.
	Postgres string
	// Client is the one-way delay between a peer and its region's node;
	// zero connects peers directly.
	Client time.Duration
	// NoHandshake turns off the modelling of TCP's handshake: without it,
	// the first byte of a new connection arrives one one-way delay after
	// the dial instead of three (SYN, SYN-ACK, then the data).
	NoHandshake bool
}

// DefaultTopology is issue 14's: Amsterdam, Ashburn and Sydney, Postgres in
// Amsterdam, peers next to their node.
func DefaultTopology() Topology {
	t := Topology{
		Regions:  []Region{{"ams", "127.0.10.1"}, {"iad", "127.0.20.1"}, {"syd", "127.0.30.1"}},
		OneWay:   map[string]time.Duration{},
		Postgres: "ams",
	}
	t.SetDelay("ams", "iad", 40*time.Millisecond)
	t.SetDelay("ams", "syd", 140*time.Millisecond)
	t.SetDelay("iad", "syd", 100*time.Millisecond)
	return t
}

func pairKey(a, b string) string {
	if a > b {
		a, b = b, a
	}
	return a + "-" + b
}

// SetDelay sets the one-way delay between regions a and b (both ways).
func (t *Topology) SetDelay(a, b string, d time.Duration) {
	if t.OneWay == nil {
		t.OneWay = map[string]time.Duration{}
	}
	t.OneWay[pairKey(a, b)] = d
}

// Delay is the one-way delay between regions a and b; zero within a region.
func (t Topology) Delay(a, b string) time.Duration {
	if a == b {
		return 0
	}
	return t.OneWay[pairKey(a, b)]
}

// RTT is the round trip between regions a and b.
func (t Topology) RTT(a, b string) time.Duration { return 2 * t.Delay(a, b) }

// RegionOf names the region an address ("ip" or "ip:port") belongs to.
func (t Topology) RegionOf(addr string) (string, bool) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	for _, r := range t.Regions {
		if r.IP == host {
			return r.Name, true
		}
	}
	return "", false
}

// Region returns the region called name.
func (t Topology) Region(name string) (Region, bool) {
	i := slices.IndexFunc(t.Regions, func(r Region) bool { return r.Name == name })
	if i < 0 {
		return Region{}, false
	}
	return t.Regions[i], true
}

// Validate reports a topology the harness cannot run.
func (t Topology) Validate() error {
	if len(t.Regions) < 2 {
		return fmt.Errorf("wan: need at least two regions, got %d", len(t.Regions))
	}
	seen := map[string]bool{}
	for _, r := range t.Regions {
		ip := net.ParseIP(r.IP)
		if r.Name == "" || ip == nil || !ip.IsLoopback() || ip.To4() == nil {
			return fmt.Errorf("wan: region %q needs a name and an IPv4 loopback address, got %q", r.Name, r.IP)
		}
		if seen[r.Name] || seen[r.IP] {
			return fmt.Errorf("wan: region %q or address %s given twice", r.Name, r.IP)
		}
		seen[r.Name], seen[r.IP] = true, true
	}
	if _, ok := t.Region(t.Postgres); !ok {
		return fmt.Errorf("wan: Postgres region %q is not one of the regions", t.Postgres)
	}
	for k, d := range t.OneWay {
		a, b, _ := strings.Cut(k, "-")
		if !seen[a] || !seen[b] || d < 0 {
			return fmt.Errorf("wan: delay %s=%s names an unknown region or is negative", k, d)
		}
	}
	if t.Client < 0 {
		return fmt.Errorf("wan: negative client delay %s", t.Client)
	}
	return nil
}

// ParseDelays overrides delays of t from "ams-iad=40ms,ams-syd=140ms"; an
// empty string changes nothing.
func (t *Topology) ParseDelays(s string) error {
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		pair, val, ok := strings.Cut(item, "=")
		a, b, ok2 := strings.Cut(pair, "-")
		if !ok || !ok2 {
			return fmt.Errorf("wan: delay %q is not REGION-REGION=DURATION", item)
		}
		d, err := time.ParseDuration(val)
		if err != nil {
			return fmt.Errorf("wan: delay %q: %w", item, err)
		}
		if _, ok := t.Region(a); !ok {
			return fmt.Errorf("wan: delay %q: unknown region %q", item, a)
		}
		if _, ok := t.Region(b); !ok {
			return fmt.Errorf("wan: delay %q: unknown region %q", item, b)
		}
		t.SetDelay(a, b, d)
	}
	return nil
}

// String lists the delays, e.g. "ams-iad 40ms, ams-syd 140ms, iad-syd 100ms".
func (t Topology) String() string {
	var parts []string
	for i, a := range t.Regions {
		for _, b := range t.Regions[i+1:] {
			parts = append(parts, fmt.Sprintf("%s↔%s %s", a.Name, b.Name, t.Delay(a.Name, b.Name)))
		}
	}
	s := "one-way " + strings.Join(parts, ", ") + "; Postgres in " + t.Postgres
	if t.Client > 0 {
		s += fmt.Sprintf("; peer↔node %s", t.Client)
	}
	return s
}

// Wire is what the simulated network allows: the least time each path of
// the table can take when the broker adds nothing but the network.
type Wire struct{ T Topology }

// PostgresRTT is one round trip from a peer's node in region r to
// Postgres.
func (w Wire) PostgresRTT(r string) time.Duration { return w.T.RTT(r, w.T.Postgres) }

// Request is a peer's request on the node of region r that needs one round
// trip to Postgres before its answer (a hello, a send until its ack).
func (w Wire) Request(r string) time.Duration { return 2*w.T.Client + w.PostgresRTT(r) }

// Push is a send from a peer in src to its push to a peer in dst: the send
// reaches Postgres, the commit's notification reaches dst's node.
func (w Wire) Push(src, dst string) time.Duration {
	return 2*w.T.Client + w.T.Delay(src, w.T.Postgres) + w.T.Delay(w.T.Postgres, dst)
}

// Join is a session's hello_ack in src until a peer in dst is told of it
// (a peer_joined event): the entry travels one one-way delay between the
// nodes; the hello_ack and the event each cross one peer↔node link.
func (w Wire) Join(src, dst string) time.Duration { return w.T.Delay(src, dst) }

// Status is a set_status written by a peer in src until a peer in dst is
// told (a peer_status event).
func (w Wire) Status(src, dst string) time.Duration { return 2*w.T.Client + w.T.Delay(src, dst) }
