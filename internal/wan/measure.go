package wan

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

// Dist summarises latencies.
type Dist struct {
	N                  int
	P50, P99, Min, Max time.Duration
}

// NewDist summarises ds (in any order).
func NewDist(ds []time.Duration) Dist {
	if len(ds) == 0 {
		return Dist{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return Dist{N: len(s), P50: faultkit.Quantile(s, 0.5), P99: faultkit.Quantile(s, 0.99), Min: s[0], Max: s[len(s)-1]}
}

// Runner drives the scenarios on a cluster. Each scenario uses members of
// its own and closes its peers when it is done.
type Runner struct {
	t  testing.TB
	c  *Cluster
	mu sync.Mutex // guards c.next
}

// NewRunner returns a runner for c.
func NewRunner(t testing.TB, c *Cluster) *Runner { return &Runner{t: t, c: c} }

// member hands out the next unused member of the mesh.
func (r *Runner) member() client.Identity {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.c.next >= len(r.c.Mesh.Members) {
		r.t.Fatalf("wan: the scenarios need more than the %d members enrolled (Options.Members)", len(r.c.Mesh.Members))
	}
	id := r.c.Mesh.Members[r.c.next]
	r.c.next++
	return id
}

// connect connects a new member's peer to region's node.
func (r *Runner) connect(region string) *Peer {
	r.t.Helper()
	return r.connectAs(region, r.member(), "")
}

func (r *Runner) connectAs(region string, id client.Identity, session string) *Peer {
	r.t.Helper()
	p, err := r.dial(region, id, session)
	if err != nil {
		r.t.Fatal(err)
	}
	return p
}

// dial connects a peer; usable from any goroutine. The peer is closed
// when the test ends, if not before.
func (r *Runner) dial(region string, id client.Identity, session string) (*Peer, error) {
	if session == "" {
		session = "s-" + id.MemberID
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := Connect(ctx, r.c.Node(region).PeerURL(), id, session)
	if err != nil {
		return nil, fmt.Errorf("wan: connect to %s: %w", region, err)
	}
	r.t.Cleanup(p.Close)
	return p, nil
}

// forRegions runs fn for each region at once and waits.
func forRegions(regions []string, fn func(region string)) {
	var wg sync.WaitGroup
	for _, reg := range regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(reg)
		}()
	}
	wg.Wait()
}

func (r *Runner) regions() []string {
	var out []string
	for _, reg := range r.c.T.Regions {
		out = append(out, reg.Name)
	}
	return out
}

// FirstHello is the first hello on a node.
type FirstHello struct {
	Took       time.Duration
	AfterStart time.Duration // how long after the node started it was sent
}

// FirstHellos measures the first hello on every node (all at once). Run it
// before anything else connects.
func (r *Runner) FirstHellos() map[string]FirstHello {
	out := map[string]FirstHello{}
	var mu sync.Mutex
	ids := map[string]client.Identity{}
	for _, reg := range r.regions() {
		ids[reg] = r.member()
	}
	forRegions(r.regions(), func(reg string) {
		after := time.Since(r.c.Node(reg).Started)
		p, err := r.dial(reg, ids[reg], "")
		if err != nil {
			r.t.Error(err)
			return
		}
		p.Close()
		mu.Lock()
		out[reg] = FirstHello{Took: p.Hello, AfterStart: after}
		mu.Unlock()
	})
	return out
}

// LaterHellos measures n hellos per node after the first, each a new
// member on a new connection, one after another (the nodes at once).
func (r *Runner) LaterHellos(n int) map[string]Dist {
	out := map[string]Dist{}
	var mu sync.Mutex
	ids := map[string][]client.Identity{}
	for _, reg := range r.regions() {
		for range n {
			ids[reg] = append(ids[reg], r.member())
		}
	}
	forRegions(r.regions(), func(reg string) {
		var ds []time.Duration
		for _, id := range ids[reg] {
			p, err := r.dial(reg, id, "")
			if err != nil {
				r.t.Error(err)
				return
			}
			ds = append(ds, p.Hello)
			p.Close()
		}
		mu.Lock()
		out[reg] = NewDist(ds)
		mu.Unlock()
	})
	return out
}

// ackTimeout bounds the wait for one ack or push in the healthy
// scenarios.
const ackTimeout = 30 * time.Second

// SendAcks measures send→ack on every node: a peer sends n messages, one
// at a time, to a peer on the same node (the nodes at once). The first
// send on each node is reported on its own (first), the others as a
// distribution (later).
func (r *Runner) SendAcks(n int) (first map[string]time.Duration, later map[string]Dist) {
	first, later = map[string]time.Duration{}, map[string]Dist{}
	var mu sync.Mutex
	type pair struct{ from, to *Peer }
	pairs := map[string]pair{}
	for _, reg := range r.regions() {
		pairs[reg] = pair{r.connect(reg), r.connect(reg)}
	}
	forRegions(r.regions(), func(reg string) {
		pr := pairs[reg]
		var ds []time.Duration
		for i := range n {
			cmid := fmt.Sprintf("ack-%s-%d", reg, i)
			sent, err := pr.from.Send(context.Background(), pr.to.ID.Pubkey(), cmid, cmid)
			if err != nil {
				r.t.Errorf("wan: send on %s: %v", reg, err)
				return
			}
			a, at, ok := pr.from.WaitAck(cmid, ackTimeout)
			if !ok || !a.Queued {
				r.t.Errorf("wan: send %s on %s: no ack within %s (%+v)", cmid, reg, ackTimeout, a)
				return
			}
			ds = append(ds, at.Sub(sent))
			// The recipient's push is not measured here, but waiting for it
			// keeps one send from overlapping the last one's delivery.
			pr.to.WaitPush(cmid, ackTimeout)
		}
		mu.Lock()
		first[reg] = ds[0]
		later[reg] = NewDist(ds[1:])
		mu.Unlock()
	})
	for _, pr := range pairs {
		pr.from.Close()
		pr.to.Close()
	}
	return first, later
}

// Push is send→push between two regions.
type Push struct {
	Dist
	// Claims counts, by reason, how the recipient's node handed the rows
	// to its session ("relayed" is the remote fast path: pushed from the
	// notification, without a claim).
	Claims map[string]float64
}

// claimReasons are the labels of broker_delivery_claims_total.
var claimReasons = []string{"relayed", "hello", "local", "notify", "status", "release", "more", "backlog", "sweep", "takeover"}

// Pushes measures send→push from a peer in src to a peer in dst: n
// messages one at a time, each once the last arrived.
func (r *Runner) Pushes(src, dst string, n int) Push {
	r.t.Helper()
	from, to := r.connect(src), r.connect(dst)
	defer from.Close()
	defer to.Close()
	// Until the sender's node sees the recipient live, its rows take the
	// claim path; measure the steady state.
	if src != dst && !waitUntil(30*time.Second, func() bool {
		_, ok := r.c.Node(src).Replica().SoleRemoteSession(to.ID.MemberID)
		return ok
	}) {
		r.t.Fatalf("wan: %s never saw the recipient's session on %s", src, dst)
	}
	dn := r.c.Node(dst)
	before := map[string]float64{}
	for _, reason := range claimReasons {
		before[reason] = dn.Counter("broker_delivery_claims_total", "reason", reason)
	}
	var ds []time.Duration
	for i := range n {
		cmid := fmt.Sprintf("push-%s-%s-%d", src, dst, i)
		sent, err := from.Send(context.Background(), to.ID.Pubkey(), cmid, cmid)
		if err != nil {
			r.t.Fatalf("wan: send: %v", err)
		}
		at, ok := to.WaitPush(cmid, ackTimeout)
		if !ok {
			r.t.Fatalf("wan: push %s %s→%s did not arrive within %s", cmid, src, dst, ackTimeout)
		}
		ds = append(ds, at.Sub(sent))
		if a, _, ok := from.WaitAck(cmid, ackTimeout); !ok || !a.Queued {
			r.t.Fatalf("wan: send %s: no ack (%+v)", cmid, a)
		}
	}
	claims := map[string]float64{}
	for _, reason := range claimReasons {
		if d := dn.Counter("broker_delivery_claims_total", "reason", reason) - before[reason]; d > 0 {
			claims[reason] = d
		}
	}
	return Push{Dist: NewDist(ds), Claims: claims}
}

// PresenceJoins measures how long after a peer's hello_ack in src an
// observer in dst is told it joined (peer_joined), for n new members one
// after another.
func (r *Runner) PresenceJoins(src, dst string, n int) Dist {
	r.t.Helper()
	obs := r.connect(dst)
	defer obs.Close()
	var ds []time.Duration
	for range n {
		p := r.connect(src)
		ev, ok := obs.WaitEvent(time.Time{}, ackTimeout, func(e Event) bool {
			return e.Name == protocol.EventPeerJoined && e.Data.PresenceID == p.PresenceID
		})
		if !ok {
			r.t.Fatalf("wan: the observer in %s was not told of a join in %s within %s", dst, src, ackTimeout)
		}
		ds = append(ds, ev.At.Sub(p.HelloAckAt))
		p.Close()
	}
	return NewDist(ds)
}

// PresenceStatuses measures how long after a peer in src sets its status
// an observer in dst is told (peer_status), for n changes.
func (r *Runner) PresenceStatuses(src, dst string, n int) Dist {
	r.t.Helper()
	obs := r.connect(dst)
	defer obs.Close()
	p := r.connect(src)
	defer p.Close()
	if _, ok := obs.WaitEvent(time.Time{}, ackTimeout, func(e Event) bool {
		return e.Name == protocol.EventPeerJoined && e.Data.PresenceID == p.PresenceID
	}); !ok {
		r.t.Fatalf("wan: the observer in %s never saw the peer in %s", dst, src)
	}
	var ds []time.Duration
	for i := range n {
		status := protocol.StatusWorking
		if i%2 == 1 {
			status = protocol.StatusIdle
		}
		at, err := p.SetStatus(context.Background(), status)
		if err != nil {
			r.t.Fatalf("wan: set_status: %v", err)
		}
		ev, ok := obs.WaitEvent(at, ackTimeout, func(e Event) bool {
			return e.Name == protocol.EventPeerStatus && e.Data.PresenceID == p.PresenceID && e.Data.Status == status
		})
		if !ok {
			r.t.Fatalf("wan: the observer in %s was not told of status %s in %s within %s", dst, status, src, ackTimeout)
		}
		ds = append(ds, ev.At.Sub(at))
	}
	return NewDist(ds)
}

// GossipCut is what a gossip cut of one region did.
type GossipCut struct {
	Region string
	Cut    time.Duration
	// Unreachable is how long into the cut both other nodes reported the
	// region unreachable (presence.Cluster.Reachable); zero if they never
	// did during the cut.
	Unreachable time.Duration
	// DeclaredDead is how long into the cut both other nodes had declared
	// the region dead; zero if they never did during the cut.
	DeclaredDead time.Duration
	// Whole is from the heal until every node saw every other one again
	// (zero when the cluster never split).
	Whole time.Duration
	// Healed is from the heal until every node saw every other one and all
	// replicas agreed on the mesh's sessions (one connected in the cut
	// region during the cut included); zero if that did not happen within
	// HealTimeout.
	Healed      time.Duration
	HealTimeout time.Duration
	Load        faultkit.Report
}

// GossipCutLoad is the burst that runs through a gossip cut.
type GossipCutLoad struct {
	Peers int     // spread over the regions' nodes; default 6
	Rate  float64 // messages per second, all peers together; default 20
	// Before and After are how long the load runs before the cut and
	// after the heal; default 2 s each.
	Before, After time.Duration
	// HealTimeout bounds the wait for the views to heal; default 60 s,
	// negative for no wait (and no session connected during the cut).
	HealTimeout time.Duration
}

// CutGossip runs a burst across the cluster, cuts region's gossip from the
// others for cut, heals it, and accounts for every message.
func (r *Runner) CutGossip(region string, cut time.Duration, load GossipCutLoad) GossipCut {
	r.t.Helper()
	if load.Peers == 0 {
		load.Peers = 6
	}
	if load.Rate == 0 {
		load.Rate = 20
	}
	if load.Before == 0 {
		load.Before = 2 * time.Second
	}
	if load.After == 0 {
		load.After = 2 * time.Second
	}
	if load.HealTimeout == 0 {
		load.HealTimeout = 60 * time.Second
	}
	var urls []string
	for _, n := range r.c.Nodes {
		urls = append(urls, n.PeerURL())
	}
	var members []client.Identity
	for range load.Peers {
		members = append(members, r.member())
	}
	late := r.member()
	b := faultkit.Start(r.t, faultkit.Options{URLs: urls, Members: members, Rate: load.Rate, Size: 256, Seed: 14})
	defer b.Close()
	sleepFor(load.Before) // the load runs meanwhile

	res := GossipCut{Region: region, Cut: cut, HealTimeout: load.HealTimeout}
	cutAt := b.Mark("gossip cut " + region)
	r.c.CutGossip(region)
	others := slices.DeleteFunc(slices.Clone(r.c.Nodes), func(n *Node) bool { return n.Region.Name == region })
	n := len(r.c.Nodes)
	var lateIn *Peer
	deadline := cutAt.Add(cut)
	for time.Now().Before(deadline) {
		if res.Unreachable == 0 && !slices.ContainsFunc(others, func(o *Node) bool { return o.Cluster().Reachable(region) }) {
			res.Unreachable = time.Since(cutAt)
		}
		if res.DeclaredDead == 0 && !slices.ContainsFunc(others, func(o *Node) bool { return o.Cluster().NumMembers() == n }) {
			res.DeclaredDead = time.Since(cutAt)
		}
		if lateIn == nil && load.HealTimeout > 0 && time.Since(cutAt) > time.Second {
			// A session that connects in the cut region meanwhile.
			lateIn = r.connectAs(region, late, "")
		}
		sleepFor(min(50*time.Millisecond, time.Until(deadline)))
	}
	healAt := b.Mark("heal")
	r.c.HealGossip()
	if load.HealTimeout > 0 {
		if res.DeclaredDead > 0 && r.c.WaitMembers(res.HealTimeout, n) {
			res.Whole = time.Since(healAt)
		}
		if waitUntil(res.HealTimeout, func() bool { return r.converged(n, lateIn) }) {
			res.Healed = time.Since(healAt)
		}
		lateIn.Close()
	}
	sleepFor(load.After)
	res.Load = b.Settle(60 * time.Second)
	return res
}

// Healthy is what the failure detectors said of a cluster none of whose
// nodes failed: every node declared dead, and every time a node stopped
// answering another, counted on all nodes.
type Healthy struct {
	Took        time.Duration
	Deaths      uint64
	Unreachable uint64
	Load        faultkit.Report
}

// HealthyLoad is the load of the Healthy scenario.
type HealthyLoad struct {
	Peers int           // spread over the regions' nodes; default 30
	Rate  float64       // messages per second, all peers together; default 300
	For   time.Duration // default 20 s
}

// Healthy runs a burst across the healthy cluster, far regions included,
// with presence changing meanwhile (every peer of the burst connects on
// it), and reports whether any node took another for dead or silent: the
// false positives of the WAN profile's failure detection.
func (r *Runner) Healthy(load HealthyLoad) Healthy {
	r.t.Helper()
	if load.Peers == 0 {
		load.Peers = 30
	}
	if load.Rate == 0 {
		load.Rate = 300
	}
	if load.For == 0 {
		load.For = 20 * time.Second
	}
	var urls []string
	for _, n := range r.c.Nodes {
		urls = append(urls, n.PeerURL())
	}
	var members []client.Identity
	for range load.Peers {
		members = append(members, r.member())
	}
	deaths, silent := r.c.DetectorCounts()
	start := time.Now()
	b := faultkit.Start(r.t, faultkit.Options{URLs: urls, Members: members, Rate: load.Rate, Size: 256, Seed: 15})
	defer b.Close()
	sleepFor(load.For) // the load runs meanwhile
	res := Healthy{Took: time.Since(start)}
	res.Load = b.Settle(60 * time.Second)
	d, u := r.c.DetectorCounts()
	res.Deaths, res.Unreachable = d-deaths, u-silent
	return res
}

// converged reports whether every node sees all n nodes and every replica
// lists the same live sessions of the mesh, late's among them.
func (r *Runner) converged(n int, late *Peer) bool {
	var want []string
	for i, nd := range r.c.Nodes {
		if nd.Cluster().NumMembers() != n {
			return false
		}
		ids := sessionIDs(nd.Replica().Live(r.c.Mesh.MeshID))
		if i == 0 {
			want = ids
			if late != nil && !slices.Contains(want, late.PresenceID) {
				return false
			}
		} else if !slices.Equal(ids, want) {
			return false
		}
	}
	return true
}

func sessionIDs(es []presence.Entry) []string {
	ids := make([]string, 0, len(es))
	for _, e := range es {
		ids = append(ids, e.PresenceID)
	}
	slices.Sort(ids)
	return ids
}

// sleepFor lets the cluster run for d while a scenario's load or cut
// lasts; it is the scenario's duration, not a wait for a condition.
func sleepFor(d time.Duration) {
	if d > 0 {
		time.Sleep(d)
	}
}

// SendOutcome is what one send saw.
type SendOutcome struct {
	At     time.Duration // when it was written, from the cut
	Took   time.Duration // until its ack; zero when none came
	Result string        // "queued", an ack error code, or "no ack"
}

// PostgresCut is what a Postgres cut from one region did.
type PostgresCut struct {
	Region string
	Cut    time.Duration
	// Unhealthy is from the cut until /health answered 503; zero if it
	// never did during the cut.
	Unhealthy time.Duration
	// Healthy is from the heal until /health answered 200 again; zero if
	// not within a minute.
	Healthy time.Duration
	// Sends are the sends made during the cut, one a second.
	Sends []SendOutcome
	// AtHeal is a send written as the path healed, by a peer that sent
	// nothing during the cut, until it was committed: a send answered
	// with an error is written again at once, as an application retries
	// (AtHealTries counts the writes). AfterHealthy is one written once
	// /health was 200 again.
	AtHeal       time.Duration
	AtHealTries  int
	AtHealErrors []string
	AfterHealthy time.Duration
	// Delivered counts the acked sends pushed to their recipient; Missing
	// and Duplicated those that were not, or more than once.
	Delivered, Missing, Duplicated int
}

// CutPostgres cuts region's node from Postgres for cut (blackholed, as a
// network partition would), sending from that node meanwhile, then heals
// it and measures the node's recovery.
func (r *Runner) CutPostgres(region string, cut time.Duration) PostgresCut {
	r.t.Helper()
	nd := r.c.Node(region)
	sender, first, rcpt := r.connect(region), r.connect(region), r.connect(region)
	defer sender.Close()
	defer first.Close()
	defer rcpt.Close()
	to := rcpt.ID.Pubkey()
	// Warm: both senders have sent once.
	for i, p := range []*Peer{sender, first} {
		cmid := "pg-warm-" + strconv.Itoa(i)
		if _, err := p.Send(context.Background(), to, cmid, cmid); err != nil {
			r.t.Fatal(err)
		}
		if a, _, ok := p.WaitAck(cmid, ackTimeout); !ok || !a.Queued {
			r.t.Fatalf("wan: warm-up send: %+v", a)
		}
	}

	res := PostgresCut{Region: region, Cut: cut}
	cutAt := time.Now()
	nd.Postgres.Cut()
	type inFlight struct {
		cmid string
		sent time.Time
	}
	var sends []inFlight
	next := cutAt
	for time.Since(cutAt) < cut {
		if res.Unhealthy == 0 && health(nd) == http.StatusServiceUnavailable {
			res.Unhealthy = time.Since(cutAt)
		}
		if !time.Now().Before(next) {
			cmid := fmt.Sprintf("pg-cut-%d", len(sends))
			at, err := sender.Send(context.Background(), to, cmid, cmid)
			if err != nil {
				r.t.Fatalf("wan: send during the cut: %v", err)
			}
			sends = append(sends, inFlight{cmid, at})
			next = next.Add(time.Second)
		}
		sleepFor(min(50*time.Millisecond, cut-time.Since(cutAt)))
	}
	healAt := time.Now()
	nd.Postgres.Heal()
	atHeal := "pg-at-heal"
	sentAtHeal := time.Now()
	for res.AtHeal == 0 && time.Since(sentAtHeal) < ackTimeout {
		cmid := atHeal + "-" + strconv.Itoa(res.AtHealTries)
		if _, err := first.Send(context.Background(), to, cmid, cmid); err != nil {
			r.t.Fatal(err)
		}
		res.AtHealTries++
		a, at, ok := first.WaitAck(cmid, ackTimeout-time.Since(sentAtHeal))
		switch {
		case !ok:
			res.AtHealErrors = append(res.AtHealErrors, "no ack")
		case a.Queued:
			res.AtHeal = at.Sub(sentAtHeal)
			atHeal = cmid
		default:
			res.AtHealErrors = append(res.AtHealErrors, a.Error)
		}
	}
	if res.AtHeal == 0 {
		r.t.Errorf("wan: a send written at the heal was not committed within %s: %v", ackTimeout, res.AtHealErrors)
	}
	if waitUntil(time.Minute, func() bool { return health(nd) == http.StatusOK }) {
		res.Healthy = time.Since(healAt)
	}
	afterHealthy := "pg-after-healthy"
	sent, err := first.Send(context.Background(), to, afterHealthy, afterHealthy)
	if err != nil {
		r.t.Fatal(err)
	}
	if a, at, ok := first.WaitAck(afterHealthy, ackTimeout); ok && a.Queued {
		res.AfterHealthy = at.Sub(sent)
	} else {
		r.t.Errorf("wan: the send after /health was 200 got %+v (acked: %v)", a, ok)
	}
	var acked []string
	for _, s := range sends {
		o := SendOutcome{At: s.sent.Sub(cutAt), Result: "no ack"}
		if a, at, ok := sender.WaitAck(s.cmid, ackTimeout); ok {
			o.Took = at.Sub(s.sent)
			o.Result = "queued"
			if !a.Queued {
				o.Result = a.Error
			} else {
				acked = append(acked, s.cmid)
			}
		}
		res.Sends = append(res.Sends, o)
	}
	if res.AtHeal > 0 {
		acked = append(acked, atHeal)
	}
	if res.AfterHealthy > 0 {
		acked = append(acked, afterHealthy)
	}
	for _, cmid := range acked {
		rcpt.WaitPush(cmid, ackTimeout)
	}
	// A duplicate would follow its first push closely; give it a moment.
	sleepFor(time.Second)
	for _, cmid := range acked {
		switch k := rcpt.Pushes(cmid); {
		case k == 0:
			res.Missing++
		case k > 1:
			res.Duplicated += k - 1
			res.Delivered++
		default:
			res.Delivered++
		}
	}
	return res
}

func health(n *Node) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	code, err := n.Healthy(ctx)
	if err != nil {
		return 0
	}
	return code
}
