package presence_test

import (
	"fmt"
	"io"
	"log"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
	"github.com/claudemesh/broker/internal/wan"
)

// gnode is one gossip node of a test: a replica, its cluster layer, and
// the transport that delays (wan.DelayTransport) and cuts
// (faultkit.Partition) its gossip.
type gnode struct {
	name    string
	ip      string
	r       *presence.Replica
	c       *presence.Cluster
	part    *faultkit.Partition
	refused atomic.Int64
	dropped atomic.Int64

	mu    sync.Mutex
	seen  map[string]time.Time // presence id → when it first became present here
	reach []presence.ReachEvent
}

type gopts struct {
	profile string
	secret  string
	topo    wan.Topology // delays between the nodes' IPs (regions named after the nodes)
}

func startGossip(t *testing.T, name, ip string, o gopts) *gnode {
	t.Helper()
	n := &gnode{name: name, ip: ip, seen: map[string]time.Time{}}
	inc := time.Now().UnixNano()
	n.r = presence.NewReplica(name, inc, time.Minute)
	n.c = presence.New(presence.Options{
		Name: name, Incarnation: inc, BindAddr: ip, Profile: o.profile, Secret: o.secret,
		Logger:    testkit.Logger(t),
		OnRefused: func() { n.refused.Add(1) },
		OnDropped: func(string) { n.dropped.Add(1) },
		WrapTransport: func(tr memberlist.NodeAwareTransport) memberlist.NodeAwareTransport {
			n.part = faultkit.NewPartition(wan.NewDelayTransport(tr, o.topo, name))
			return n.part
		},
	}, n.r)
	n.r.SetObservers(func(changes []presence.Change) {
		n.mu.Lock()
		defer n.mu.Unlock()
		for _, ch := range changes {
			if _, ok := n.seen[ch.Cur.PresenceID]; !ok && ch.Cur.Present() {
				n.seen[ch.Cur.PresenceID] = time.Now()
			}
		}
	}, n.c.Replicate)
	n.c.SetHandlers(nil, nil)
	n.c.SetReachHandler(func(ev presence.ReachEvent) {
		n.mu.Lock()
		n.reach = append(n.reach, ev)
		n.mu.Unlock()
	})
	if err := n.c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.c.Shutdown() })
	return n
}

func (n *gnode) seenAt(id string) (time.Time, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	at, ok := n.seen[id]
	return at, ok
}

func (n *gnode) reachEvents(name string) []bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []bool
	for _, ev := range n.reach {
		if ev.Name == name {
			out = append(out, ev.Reachable)
		}
	}
	return out
}

// topology names a region after each node, on its IP.
func topology(ips map[string]string) wan.Topology {
	t := wan.Topology{OneWay: map[string]time.Duration{}}
	for name, ip := range ips {
		t.Regions = append(t.Regions, wan.Region{Name: name, IP: ip})
	}
	return t
}

func join(t *testing.T, nodes ...*gnode) {
	t.Helper()
	for _, n := range nodes[1:] {
		if _, err := n.c.Join([]string{nodes[0].c.LocalAddr()}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 10*time.Second, "every node sees every other", func() bool {
		for _, n := range nodes {
			if n.c.NumMembers() != len(nodes) {
				return false
			}
		}
		return true
	})
}

func session(id string) presence.Entry {
	return presence.Entry{PresenceID: id, ConnID: "c-" + id, MeshID: "m1", MemberID: "u-" + id, SessionID: "s-" + id,
		Pubkey: strings.Repeat("ab", 32), DisplayName: "peer " + id, Cwd: "/home/someone/project", Hostname: "laptop",
		Status: protocol.StatusIdle, StatusSource: protocol.SourceJSONL, ConnectedAt: time.Now().UnixMilli()}
}

func live(n *gnode, id string) bool {
	e, ok := n.r.Get(id)
	return ok && e.IsLive()
}

// A delta crosses in one one-way delay: it travels as one acknowledged
// packet, where memberlist's reliable channel paid a TCP handshake first
// (three one-way delays). An entry too large for a packet still crosses,
// over the reliable channel.
func TestDeltaCrossesInOneWayDelay(t *testing.T) {
	const oneWay = 150 * time.Millisecond
	topo := topology(map[string]string{"a": "127.0.0.71", "b": "127.0.0.72"})
	topo.SetDelay("a", "b", oneWay)
	a := startGossip(t, "a", "127.0.0.71", gopts{profile: "lan", secret: "a secret", topo: topo})
	b := startGossip(t, "b", "127.0.0.72", gopts{profile: "lan", secret: "a secret", topo: topo})
	join(t, a, b)

	var took []time.Duration
	for i := range 5 {
		id := fmt.Sprintf("small-%d", i)
		at := a.r.Create(session(id)).ConnectedAt
		created := time.Now()
		_ = at
		testkit.Eventually(t, 5*time.Second, "b sees "+id, func() bool { return live(b, id) })
		seen, _ := b.seenAt(id)
		took = append(took, seen.Sub(created))
	}
	for _, d := range took {
		if d < oneWay-5*time.Millisecond {
			t.Fatalf("a delta crossed in %s, faster than the %s delay: the harness did not delay it", d, oneWay)
		}
	}
	slow := 0
	for _, d := range took {
		if d > oneWay+100*time.Millisecond {
			slow++
		}
	}
	if slow > 1 { // one may meet a scheduling hiccup on a loaded machine
		t.Fatalf("deltas took %v; more than one above one-way + 100 ms (%s)", took, oneWay+100*time.Millisecond)
	}
	st := a.c.Stats()
	if st.DeltaPackets < 5 || st.DeltaStreams != 0 {
		t.Fatalf("stats %+v: want the small deltas as packets", st)
	}

	big := session("big")
	big.Cwd = "/" + strings.Repeat("d", 4000)
	big.Summary = strings.Repeat("s", 1000)
	a.r.Create(big)
	testkit.Eventually(t, 5*time.Second, "b sees the large entry", func() bool { return live(b, "big") })
	if e, _ := b.r.Get("big"); e.Cwd != big.Cwd {
		t.Fatalf("large entry arrived with cwd of %d bytes", len(e.Cwd))
	}
	if st := a.c.Stats(); st.DeltaStreams == 0 {
		t.Fatalf("stats %+v: the large entry did not go over the reliable channel", st)
	}
	if !a.c.Reachable("b") || !b.c.Reachable("a") || a.c.Reachable("nobody") || !a.c.Reachable("a") {
		t.Fatal("Reachable wrong on a healthy pair")
	}
	t.Logf("one-way %s: deltas took %v; a's stats %+v", oneWay, took, a.c.Stats())
}

// A gossip cut shorter than death detection (LAN profile: ≥ 5 s): the
// deltas made during it are lost with their packets and sent again until
// the peer answers, so they arrive about a second after the heal instead
// of at the next push-pull (10 s apart); the peer is reported unreachable
// about a second into the cut, and reachable again after the heal, while
// memberlist never declares it dead. A third node, not cut, keeps getting
// its deltas throughout.
func TestDeltasLostInCutAreResent(t *testing.T) {
	ips := map[string]string{"a": "127.0.0.81", "b": "127.0.0.82", "c": "127.0.0.83"}
	topo := topology(ips)
	a := startGossip(t, "a", ips["a"], gopts{profile: "lan", topo: topo})
	b := startGossip(t, "b", ips["b"], gopts{profile: "lan", topo: topo})
	c := startGossip(t, "c", ips["c"], gopts{profile: "lan", topo: topo})
	join(t, a, b, c)
	a.r.Create(session("before"))
	testkit.Eventually(t, 5*time.Second, "b and c see a's session", func() bool { return live(b, "before") && live(c, "before") })

	cutAt := time.Now()
	a.part.Block(ips["b"])
	b.part.Block(ips["a"])
	testkit.Eventually(t, 3*time.Second, "a finds b unreachable", func() bool { return !a.c.Reachable("b") })
	unreachable := time.Since(cutAt)
	a.r.Create(session("during"))
	a.r.Update("before", func(e *presence.Entry) bool { e.Status = protocol.StatusWorking; return true })
	testkit.Eventually(t, 3*time.Second, "c sees the change made during the cut", func() bool {
		e, ok := c.r.Get("before")
		return live(c, "during") && ok && e.Status == protocol.StatusWorking
	})
	// The cut lasts 2.5 s in all: memberlist (LAN) does not declare a death
	// that soon.
	for time.Since(cutAt) < 2500*time.Millisecond {
		if live(b, "during") {
			t.Fatal("a delta crossed the cut")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if a.c.NumMembers() != 3 || b.c.NumMembers() != 3 {
		t.Fatalf("members %d / %d: the cut was long enough for a death", a.c.NumMembers(), b.c.NumMembers())
	}
	healAt := time.Now()
	a.part.Heal()
	b.part.Heal()
	testkit.Eventually(t, 5*time.Second, "b gets the deltas of the cut", func() bool {
		e, ok := b.r.Get("before")
		return live(b, "during") && ok && e.Status == protocol.StatusWorking
	})
	healed := time.Since(healAt)
	if healed > 2500*time.Millisecond {
		t.Fatalf("the deltas of the cut arrived %s after the heal: not resent", healed)
	}
	testkit.Eventually(t, 3*time.Second, "a finds b reachable again", func() bool { return a.c.Reachable("b") })
	if got := a.reachEvents("b"); len(got) < 3 || got[len(got)-2] || !got[len(got)-1] {
		t.Fatalf("a's reach events for b: %v, want …, false, true", got)
	}
	if st := a.c.Stats(); st.Deaths != 0 || st.Timeouts == 0 {
		t.Fatalf("a's stats %+v: want timeouts and no death", st)
	}
	t.Logf("unreachable after %s; deltas of the cut arrived %s after the heal; a's stats %+v", unreachable, healed, a.c.Stats())
}

// A cut long enough for each side to declare the other dead (LAN profile:
// about 5 s), then healed: the nodes find each other again on their own
// (they keep contacting the dead), and exchange full state at once,
// so that a session made during the cut appears and one removed during it
// disappears, without waiting for a periodic push-pull.
func TestRejoinAfterDeathExchangesState(t *testing.T) {
	ips := map[string]string{"a": "127.0.0.91", "b": "127.0.0.92"}
	topo := topology(ips)
	a := startGossip(t, "a", ips["a"], gopts{profile: "lan", topo: topo})
	b := startGossip(t, "b", ips["b"], gopts{profile: "lan", topo: topo})
	join(t, a, b)
	a.r.Create(session("removed"))
	a.r.Create(session("kept"))
	testkit.Eventually(t, 5*time.Second, "b sees a's sessions", func() bool { return live(b, "removed") && live(b, "kept") })

	a.part.Block(ips["b"])
	b.part.Block(ips["a"])
	testkit.Eventually(t, 20*time.Second, "each side declares the other dead", func() bool {
		return a.c.NumMembers() == 1 && b.c.NumMembers() == 1
	})
	a.r.Remove("removed")
	a.r.Create(session("made"))
	// memberlist gossips to a dead node only while it has news to spread
	// (the death itself, for a moment): past that, only this layer's
	// reconnects bring the two sides together.
	time.Sleep(3 * time.Second)
	healAt := time.Now()
	a.part.Heal()
	b.part.Heal()
	testkit.Eventually(t, 10*time.Second, "the nodes find each other", func() bool {
		return a.c.NumMembers() == 2 && b.c.NumMembers() == 2
	})
	whole := time.Since(healAt)
	testkit.Eventually(t, 5*time.Second, "b's view agrees with a's", func() bool {
		return live(b, "made") && live(b, "kept") && !live(b, "removed")
	})
	agreed := time.Since(healAt)
	// LAN push-pull is every 10 s per node: an agreement within 6 s of the
	// heal is the rejoin's own exchange.
	if agreed > 6*time.Second {
		t.Fatalf("b agreed %s after the heal", agreed)
	}
	if sa, sb := a.c.Stats(), b.c.Stats(); sa.Deaths == 0 || sa.Syncs == 0 || sa.Reconnects+sb.Reconnects == 0 {
		t.Fatalf("stats a %+v, b %+v: want a death, reconnect attempts and a sync", sa, sb)
	}
	t.Logf("membership whole %s, views agreed %s after the heal; a %+v, b %+v", whole, agreed, a.c.Stats(), b.c.Stats())
}

// With CLUSTER_SECRET, delta packets and acks from a node without the key
// are refused (counted, nothing stored, nothing acked), while the honest
// nodes' deltas keep flowing as packets.
func TestRoguePacketsWithoutTheKey(t *testing.T) {
	ips := map[string]string{"a": "127.0.0.101", "b": "127.0.0.102"}
	topo := topology(ips)
	a := startGossip(t, "a", ips["a"], gopts{profile: "lan", secret: "the cluster secret", topo: topo})
	b := startGossip(t, "b", ips["b"], gopts{profile: "lan", secret: "the cluster secret", topo: topo})
	join(t, a, b)

	cfg := memberlist.DefaultLocalConfig()
	cfg.Name, cfg.BindAddr, cfg.BindPort, cfg.AdvertisePort = "rogue", "127.0.0.103", 0, 0
	cfg.Logger = log.New(io.Discard, "", 0)
	rogue, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rogue.Shutdown() })
	host, port, _ := net.SplitHostPort(b.c.LocalAddr())
	p, _ := strconv.Atoi(port)
	target := &memberlist.Node{Name: "b", Addr: net.ParseIP(host), Port: uint16(p)}
	forged := []byte(`D{"f":"a","i":1,"q":7,"e":[{"id":"fake","o":"a","oi":1,"e":1,"v":1,"m":"m1","mb":"u-x","s":"x","x":0}]}`)
	ack := []byte(`A{"f":"a","i":1,"t":1,"q":1}`)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the attack, while honest changes flow
		defer wg.Done()
		for i := 0; i < 200; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_ = rogue.SendBestEffort(target, forged)
			_ = rogue.SendBestEffort(target, ack)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	before := a.c.Stats().DeltaPackets
	for i := range 10 {
		id := fmt.Sprintf("honest-%d", i)
		a.r.Create(session(id))
		testkit.Eventually(t, 5*time.Second, "b sees "+id, func() bool { return live(b, id) })
	}
	close(stop)
	wg.Wait()
	if _, ok := b.r.Get("fake"); ok {
		t.Fatal("the rogue injected an entry")
	}
	if b.refused.Load() == 0 {
		t.Fatal("b did not count the rogue's packets as refused")
	}
	if got := a.c.Stats().DeltaPackets - before; got < 10 {
		t.Fatalf("only %d honest delta packets during the attack", got)
	}
	t.Logf("b refused %d packets; a's stats %+v", b.refused.Load(), a.c.Stats())
}
