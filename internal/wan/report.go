package wan

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// Plan sizes a run of every scenario. Zero values are the defaults.
type Plan struct {
	Hellos   int // later hellos per node; default 10
	Sends    int // send→ack per node; default 60
	Pushes   int // per pair; default 30
	Presence int // joins and status changes each; default 10
	// PushPairs are the (from, to) regions of the push rows; default
	// syd→iad, iad→ams, ams→syd (issue 14's).
	PushPairs [][2]string
	// PresenceFrom and PresenceTo: where presence changes happen and where
	// they are watched; default syd and ams.
	PresenceFrom, PresenceTo string
	// CutRegion is cut from gossip, then from Postgres; default syd.
	CutRegion   string
	GossipCut   time.Duration // default 20 s
	PostgresCut time.Duration // default 15 s
	Load        GossipCutLoad
	// Healthy is the load under which no node may be taken for dead.
	Healthy HealthyLoad
}

func (p *Plan) normalize() {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&p.Hellos, 10)
	def(&p.Sends, 60)
	def(&p.Pushes, 30)
	def(&p.Presence, 10)
	if p.PushPairs == nil {
		p.PushPairs = [][2]string{{"syd", "iad"}, {"iad", "ams"}, {"ams", "syd"}}
	}
	if p.PresenceFrom == "" {
		p.PresenceFrom, p.PresenceTo = "syd", "ams"
	}
	if p.CutRegion == "" {
		p.CutRegion = "syd"
	}
	if p.GossipCut == 0 {
		p.GossipCut = 20 * time.Second
	}
	if p.PostgresCut == 0 {
		p.PostgresCut = 15 * time.Second
	}
}

// Result is one run of every scenario.
type Result struct {
	Date     time.Time `json:"date"`
	Topology string    `json:"topology"`
	Profile  string    `json:"profile"`
	// Machine is the CPU count and the 1-minute load average at the start
	// and the end of the run (other processes share the machine).
	Machine string `json:"machine"`
	Note    string `json:"note,omitempty"`

	Rows   []Row   `json:"rows"`
	Checks []Check `json:"checks"`
	// Values holds every number measured by key ("first_hello.syd",
	// "push_p50.ams→syd", …): milliseconds, except the counts
	// ("gossip_cut_lost", "send_at_heal_tries.syd", …).
	Values map[string]float64 `json:"values"`

	FirstHellos    map[string]FirstHello    `json:"-"`
	LaterHellos    map[string]Dist          `json:"-"`
	FirstSends     map[string]time.Duration `json:"-"`
	SendAcks       map[string]Dist          `json:"-"`
	Pushes         map[string]Push          `json:"-"`
	PresenceJoin   Dist                     `json:"-"`
	PresenceStatus Dist                     `json:"-"`
	Healthy        Healthy                  `json:"-"`
	GossipCut      GossipCut                `json:"-"`
	PostgresCut    PostgresCut              `json:"-"`
	Failover       Failover                 `json:"-"`
}

// Row is one line of the table.
type Row struct {
	Path     string `json:"path"`
	Measured string `json:"measured"`
	Wire     string `json:"wire"`
	Target   string `json:"target"`
	Holds    string `json:"holds"`
}

// Check is one measured value against a threshold.
type Check struct {
	Threshold string  `json:"threshold"`
	Key       string  `json:"key"`
	Measured  float64 `json:"measured_ms"`
	Wire      float64 `json:"wire_ms"`
	Bound     float64 `json:"bound_ms"`
	Holds     bool    `json:"holds"`
	Enforced  bool    `json:"enforced"`
	// AboveWire is false when the value is below what the wire allows: the
	// harness failed to delay something.
	AboveWire bool `json:"above_wire"`
}

func toMs(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// ms formats a duration the way the table does: "85 ms", "1,650 ms",
// "11.5 s".
func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	n := d.Round(time.Millisecond).Milliseconds()
	if n >= 1000 {
		return fmt.Sprintf("%d,%03d ms", n/1000, n%1000)
	}
	return fmt.Sprintf("%d ms", n)
}

// Run measures every scenario on c, in an order that keeps them apart:
// first hellos (before anything else touched the nodes), later hellos,
// send→ack, pushes, presence, a load on the healthy cluster, the gossip
// cut, the Postgres cut.
func Run(t testing.TB, c *Cluster, plan Plan) *Result {
	t.Helper()
	plan.normalize()
	r := NewRunner(t, c)
	res := &Result{Date: time.Now().UTC(), Topology: c.T.String(), Profile: c.Profile, Values: map[string]float64{},
		Pushes: map[string]Push{}}
	loadBefore := loadAverage()
	res.FirstHellos = r.FirstHellos()
	t.Logf("first hellos: %v", res.FirstHellos)
	res.LaterHellos = r.LaterHellos(plan.Hellos)
	t.Logf("later hellos: %v", res.LaterHellos)
	res.FirstSends, res.SendAcks = r.SendAcks(plan.Sends)
	t.Logf("send→ack: first %v, later %v", res.FirstSends, res.SendAcks)
	for _, pr := range plan.PushPairs {
		res.Pushes[pr[0]+"→"+pr[1]] = r.Pushes(pr[0], pr[1], plan.Pushes)
	}
	t.Logf("pushes: %v", res.Pushes)
	res.PresenceJoin = r.PresenceJoins(plan.PresenceFrom, plan.PresenceTo, plan.Presence)
	res.PresenceStatus = r.PresenceStatuses(plan.PresenceFrom, plan.PresenceTo, plan.Presence)
	t.Logf("presence %s→%s: joins %v, statuses %v", plan.PresenceFrom, plan.PresenceTo, res.PresenceJoin, res.PresenceStatus)
	res.Healthy = r.Healthy(plan.Healthy)
	t.Logf("healthy load: %+v", res.Healthy)
	res.GossipCut = r.CutGossip(plan.CutRegion, plan.GossipCut, plan.Load)
	t.Logf("gossip cut: %+v", res.GossipCut)
	res.PostgresCut = r.CutPostgres(plan.CutRegion, plan.PostgresCut)
	t.Logf("postgres cut: %+v", res.PostgresCut)
	// Last: it kills the cut region's node for good.
	sender, moveTo := failoverRegions(c.Wire, plan.CutRegion)
	res.Failover = r.Failover(plan.CutRegion, sender, moveTo, 20)
	t.Logf("failover: %s", res.Failover)
	for _, n := range c.Nodes {
		st := n.Cluster().Stats()
		t.Logf("gossip deltas of %s: %+v", n.Region.Name, st)
		res.Values["delta_packets."+n.Region.Name] = float64(st.DeltaPackets)
		res.Values["delta_streams."+n.Region.Name] = float64(st.DeltaStreams)
		res.Values["delta_heartbeats."+n.Region.Name] = float64(st.Heartbeats)
		res.Values["delta_timeouts."+n.Region.Name] = float64(st.Timeouts)
	}
	res.build(c.Wire, plan)
	res.Machine = fmt.Sprintf("%d CPUs, load average %s at the start, %s at the end", runtime.NumCPU(), loadBefore, loadAverage())
	return res
}

// loadAverage is the 1-minute load average (Linux), or "unknown".
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}

// farRegions are the regions other than Postgres', in topology order.
func farRegions(w Wire) []string {
	var out []string
	for _, r := range w.T.Regions {
		if r.Name != w.T.Postgres {
			out = append(out, r.Name)
		}
	}
	return out
}

// check records a value against th and returns whether it holds.
func (res *Result) check(th Threshold, key string, measured, wire time.Duration) bool {
	c := Check{Threshold: th.Name, Key: key, Measured: toMs(measured), Wire: toMs(wire), Bound: toMs(th.Bound(wire)),
		Holds: th.Holds(measured, wire), Enforced: th.EnforcedFor(key), AboveWire: AboveWire(measured, wire)}
	res.Checks = append(res.Checks, c)
	return c.Holds
}

func yesNo(ok []bool) string {
	parts := make([]string, len(ok))
	for i, v := range ok {
		parts[i] = "no"
		if v {
			parts[i] = "yes"
		}
	}
	return strings.Join(parts, " / ")
}

// perRegion builds a row's cells for the far regions: "a / b".
func perRegion(regions []string, f func(string) string) string {
	parts := make([]string, len(regions))
	for i, r := range regions {
		parts[i] = f(r)
	}
	return strings.Join(parts, " / ")
}

func (res *Result) build(w Wire, plan Plan) {
	far := farRegions(w)
	pg := w.T.Postgres
	names := strings.Join(far, " / ")
	val := func(k string, d time.Duration) { res.Values[k] = toMs(d) }

	// Hellos.
	var holds []bool
	for _, r := range far {
		holds = append(holds, res.check(FirstHelloLimit, r, res.FirstHellos[r].Took, w.Request(r)))
	}
	for r, h := range res.FirstHellos {
		val("first_hello."+r, h.Took)
		val("first_hello_after_start."+r, h.AfterStart)
	}
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("first hello on the %s node after start", names),
		Measured: perRegion(far, func(r string) string { return ms(res.FirstHellos[r].Took) }) +
			fmt.Sprintf(" (%s %s)", pg, ms(res.FirstHellos[pg].Took)),
		Wire:   perRegion(far, func(r string) string { return ms(w.Request(r)) }),
		Target: fmt.Sprintf("1 RTT: ≤ %s", perRegion(far, func(r string) string { return ms(FirstHelloLimit.Bound(w.Request(r))) })),
		Holds:  yesNo(holds),
	})
	holds = nil
	for _, r := range far {
		holds = append(holds, res.check(LaterHelloLimit, r, res.LaterHellos[r].P50, w.Request(r)))
	}
	for r, d := range res.LaterHellos {
		val("later_hello_p50."+r, d.P50)
		val("later_hello_max."+r, d.Max)
	}
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("later hellos %s (p50 of %d)", names, plan.Hellos),
		Measured: perRegion(far, func(r string) string { return ms(res.LaterHellos[r].P50) }) +
			fmt.Sprintf(" (%s %s)", pg, ms(res.LaterHellos[pg].P50)),
		Wire:   perRegion(far, func(r string) string { return ms(w.Request(r)) }),
		Target: fmt.Sprintf("1 RTT: ≤ %s", perRegion(far, func(r string) string { return ms(LaterHelloLimit.Bound(w.Request(r))) })),
		Holds:  yesNo(holds),
	})

	// Sends.
	holds = nil
	for _, r := range far {
		holds = append(holds, res.check(FirstSendLimit, r, res.FirstSends[r], w.Request(r)))
	}
	for r, d := range res.FirstSends {
		val("first_send."+r, d)
	}
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("first send on the %s node (after the hellos)", names),
		Measured: perRegion(far, func(r string) string { return ms(res.FirstSends[r]) }) +
			fmt.Sprintf(" (%s %s)", pg, ms(res.FirstSends[pg])),
		Wire:   perRegion(far, func(r string) string { return ms(w.Request(r)) }),
		Target: fmt.Sprintf("1 RTT: ≤ %s", perRegion(far, func(r string) string { return ms(FirstSendLimit.Bound(w.Request(r))) })),
		Holds:  yesNo(holds),
	})
	holds = nil
	for _, r := range far {
		d := res.SendAcks[r]
		h50 := res.check(SendAckP50Limit, r, d.P50, w.Request(r))
		h99 := res.check(SendAckP99Limit, r, d.P99, w.Request(r))
		holds = append(holds, h50 && h99)
	}
	for r, d := range res.SendAcks {
		val("send_ack_p50."+r, d.P50)
		val("send_ack_p99."+r, d.P99)
		val("send_ack_max."+r, d.Max)
	}
	res.Rows = append(res.Rows, Row{
		Path:     fmt.Sprintf("later send→ack %s p50 (p99), %d sends each, one at a time", names, res.SendAcks[far[0]].N),
		Measured: perRegion(far, func(r string) string { return fmt.Sprintf("%s (%s)", ms(res.SendAcks[r].P50), ms(res.SendAcks[r].P99)) }),
		Wire:     perRegion(far, func(r string) string { return ms(w.Request(r)) }),
		Target: fmt.Sprintf("p50 1 RTT, p99 2 RTT: ≤ %s", perRegion(far, func(r string) string {
			return fmt.Sprintf("%s (%s)", ms(SendAckP50Limit.Bound(w.Request(r))), ms(SendAckP99Limit.Bound(w.Request(r))))
		})),
		Holds: yesNo(holds),
	})
	pc := res.PostgresCut
	cr := pc.Region
	val("send_at_heal."+cr, pc.AtHeal)
	res.Values["send_at_heal_tries."+cr] = float64(pc.AtHealTries)
	val("send_after_healthy."+cr, pc.AfterHealthy)
	res.Rows = append(res.Rows, Row{
		Path:     fmt.Sprintf("first send after Postgres came back (%s): written at the heal / once `/health` was 200 again", cr),
		Measured: fmt.Sprintf("%s%s / %s", ms(pc.AtHeal), triesText(pc.AtHealTries, pc.AtHealErrors), ms(pc.AfterHealthy)),
		Wire:     ms(w.Request(cr)),
		Target:   fmt.Sprintf("1 RTT: ≤ %s", ms(FirstSendAfterOutageLimit.Bound(w.Request(cr)))),
		Holds: yesNo([]bool{res.check(FirstSendAfterOutageLimit, cr, pc.AtHeal, w.Request(cr)),
			res.check(SendAfterHealthyLimit, cr, pc.AfterHealthy, w.Request(cr))}),
	})

	// Pushes.
	for _, pr := range plan.PushPairs {
		key := pr[0] + "→" + pr[1]
		p := res.Pushes[key]
		wire := w.Push(pr[0], pr[1])
		val("push_p50."+key, p.P50)
		val("push_p99."+key, p.P99)
		res.Rows = append(res.Rows, Row{
			Path:     fmt.Sprintf("push %s p50 (p99), %d messages", key, p.N),
			Measured: fmt.Sprintf("%s (%s); rows handed over by %s", ms(p.P50), ms(p.P99), claimText(p.Claims)),
			Wire:     ms(wire),
			Target:   fmt.Sprintf("1.25 × wire + 10 ms: ≤ %s", ms(PushP50Limit.Bound(wire))),
			Holds:    yesNo([]bool{res.check(PushP50Limit, key, p.P50, wire)}),
		})
	}

	// Presence.
	from, to := plan.PresenceFrom, plan.PresenceTo
	jw, sw := w.Join(from, to), w.Status(from, to)
	val("presence_join_p50."+from+"→"+to, res.PresenceJoin.P50)
	val("presence_status_p50."+from+"→"+to, res.PresenceStatus.P50)
	res.Rows = append(res.Rows, Row{
		Path:     fmt.Sprintf("presence: a %s connect / status change seen in %s (system event, p50 of %d)", from, to, res.PresenceJoin.N),
		Measured: fmt.Sprintf("%s / %s", ms(res.PresenceJoin.P50), ms(res.PresenceStatus.P50)),
		Wire:     fmt.Sprintf("%s / %s", ms(jw), ms(sw)),
		Target:   fmt.Sprintf("one-way + 50 ms: ≤ %s / %s", ms(PresenceLimit.Bound(jw)), ms(PresenceLimit.Bound(sw))),
		Holds: yesNo([]bool{res.check(PresenceLimit, "join."+from+"→"+to, res.PresenceJoin.P50, jw),
			res.check(PresenceLimit, "status."+from+"→"+to, res.PresenceStatus.P50, sw)}),
	})

	// Healthy load.
	h := res.Healthy
	res.Values["healthy_deaths"] = float64(h.Deaths)
	res.Values["healthy_unreachable"] = float64(h.Unreachable)
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("load on the healthy cluster for %s (%d peers, %d messages, all regions)", ms(h.Took), h.Load.Peers, h.Load.Offered),
		Measured: fmt.Sprintf("nodes declared dead: %d; a node stopped answering another: %d times; %d lost, %d duplicated, latency p50 %s",
			h.Deaths, h.Unreachable, h.Load.Lost, h.Load.AppDuplicates, ms(h.Load.P50)),
		Wire:   "—",
		Target: "no node declared dead",
		Holds:  yesNo([]bool{h.Deaths == 0 && h.Load.Lost == 0 && h.Load.AppDuplicates == 0}),
	})

	// Gossip cut.
	g := res.GossipCut
	l := g.Load
	dead := "never during the cut"
	if g.DeclaredDead > 0 {
		dead = "after " + ms(g.DeclaredDead)
		val("gossip_cut_declared_dead."+g.Region, g.DeclaredDead)
	}
	deadHolds := res.check(DeadRegionLimit, g.Region, orForever(g.DeclaredDead, g.Cut), 0)
	unreachable := "never during the cut"
	if g.Unreachable > 0 {
		unreachable = "after " + ms(g.Unreachable)
		val("gossip_cut_unreachable."+g.Region, g.Unreachable)
	}
	unreachableHolds := res.check(UnreachableLimit, g.Region, orForever(g.Unreachable, g.Cut), 0)
	healed := fmt.Sprintf("replicas did not agree within %s of the heal", ms(g.HealTimeout))
	if g.Healed > 0 {
		healed = fmt.Sprintf("replicas agreed %s after the heal", ms(g.Healed))
		val("gossip_cut_healed."+g.Region, g.Healed)
	}
	healHolds := true
	if g.HealTimeout > 0 {
		healHolds = res.check(HealLimit, g.Region, orForever(g.Healed, g.HealTimeout), 0)
	}
	if g.Whole > 0 {
		healed = fmt.Sprintf("membership whole %s and %s", ms(g.Whole), healed)
		val("gossip_cut_whole."+g.Region, g.Whole)
	}
	res.Values["gossip_cut_lost"] = float64(l.Lost)
	res.Values["gossip_cut_duplicated"] = float64(l.AppDuplicates)
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("gossip cut %s↔others %s (load: %d peers, %d messages)", g.Region, ms(g.Cut), l.Peers, l.Offered),
		Measured: fmt.Sprintf("%d lost, %d duplicated (%d redelivered and deduped, %d unacked); the others found %s unreachable %s and declared it dead %s; views (sessions, one made in %s during the cut included): %s",
			l.Lost, l.AppDuplicates, l.Redeliveries, l.Unacked, g.Region, unreachable, dead, g.Region, healed),
		Wire:   "—",
		Target: fmt.Sprintf("0 lost, 0 duplicated; unreachable %s, dead %s; views agree %s after the heal", UnreachableLimit, DeadRegionLimit, HealLimit),
		Holds:  yesNo([]bool{l.Lost == 0 && l.AppDuplicates == 0 && l.Unacked == 0 && l.SettleErr == nil, unreachableHolds && deadHolds, healHolds}),
	})

	// Postgres cut.
	val("postgres_cut_unhealthy."+cr, pc.Unhealthy)
	val("postgres_cut_healthy_again."+cr, pc.Healthy)
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("Postgres cut from %s %s (blackholed)", cr, ms(pc.Cut)),
		Measured: fmt.Sprintf("`/health` 503 after %s, 200 again %s after the heal; sends: %s; acked sends delivered %d, missing %d, duplicated %d",
			orNever(pc.Unhealthy), orNever(pc.Healthy), sendsText(pc.Sends, pc.Cut), pc.Delivered, pc.Missing, pc.Duplicated),
		Wire:   "—",
		Target: "—",
		Holds:  yesNo([]bool{pc.Missing == 0 && pc.Duplicated == 0}),
	})

	// Failover.
	f := res.Failover
	val("failover_reattach_to_last."+f.Dead, f.Delivered)
	res.Values["failover_lost"] = float64(f.N - f.Got)
	res.Values["failover_duplicated"] = float64(f.Dup)
	res.Values["failover_leased_to_dead"] = float64(f.Leased)
	fh := f.Got == f.N && res.check(FailoverLimit, f.Dead, f.Delivered, 0)
	res.Rows = append(res.Rows, Row{
		Path: fmt.Sprintf("failover: %s node killed, %d messages from %s acked while away, the peer reattaches on %s", f.Dead, f.N, f.Sender, f.MoveTo),
		Measured: fmt.Sprintf("the last arrived %s after the reattach (reattach %s after the kill; %d of %d leased to the dead session); %d lost, %d duplicated",
			ms(f.Delivered), ms(f.Reattached), f.Leased, f.N, f.N-f.Got, f.Dup),
		Wire:   fmt.Sprintf("%s (%s's round trip to Postgres)", ms(w.Request(f.MoveTo)), f.MoveTo),
		Target: FailoverLimit.String() + " after the reattach, 0 lost, 0 duplicated",
		Holds:  yesNo([]bool{fh && f.Dup == 0}),
	})
}

// failoverRegions picks the failover's sender (Postgres' region, unless it
// is the one killed) and where the peer moves (another region).
func failoverRegions(w Wire, dead string) (sender, moveTo string) {
	for _, r := range w.T.Regions {
		switch {
		case r.Name == dead:
		case sender == "" && r.Name == w.T.Postgres:
			sender = r.Name
		case moveTo == "":
			moveTo = r.Name
		}
	}
	if sender == "" {
		sender, moveTo = moveTo, sender
		for _, r := range w.T.Regions {
			if r.Name != dead && r.Name != sender {
				moveTo = r.Name
			}
		}
	}
	return sender, moveTo
}

func triesText(tries int, errs []string) string {
	if tries <= 1 {
		return ""
	}
	return fmt.Sprintf(" (written %d times: first answered %s)", tries, strings.Join(errs, ", "))
}

func orForever(d, cut time.Duration) time.Duration {
	if d == 0 {
		return cut
	}
	return d
}

func orNever(d time.Duration) string {
	if d == 0 {
		return "never"
	}
	return ms(d)
}

func claimText(claims map[string]float64) string {
	if len(claims) == 0 {
		return "nothing counted"
	}
	keys := make([]string, 0, len(claims))
	for k := range claims {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		name := k
		if k == "relayed" {
			name = "fast path"
		} else {
			name = "claim (" + k + ")"
		}
		parts[i] = fmt.Sprintf("%s %.0f", name, claims[k])
	}
	return strings.Join(parts, ", ")
}

// sendsText summarises the sends made during a Postgres cut: how many got
// each outcome, and when (from the cut) their answers came.
func sendsText(sends []SendOutcome, cut time.Duration) string {
	if len(sends) == 0 {
		return "none made"
	}
	type agg struct {
		n           int
		first, last time.Duration // answered, from the cut
		longest     time.Duration
	}
	by := map[string]*agg{}
	var order []string
	for _, s := range sends {
		answered := s.At + s.Took
		a := by[s.Result]
		if a == nil {
			a = &agg{first: answered, last: answered}
			by[s.Result] = a
			order = append(order, s.Result)
		}
		a.n++
		a.first, a.last, a.longest = min(a.first, answered), max(a.last, answered), max(a.longest, s.Took)
	}
	parts := make([]string, 0, len(order))
	for _, k := range order {
		a := by[k]
		if k == "no ack" {
			parts = append(parts, fmt.Sprintf("%d no ack", a.n))
			continue
		}
		parts = append(parts, fmt.Sprintf("%d `%s`, answered %s–%s after the cut (the longest waited %s)",
			a.n, k, secs(a.first), secs(a.last), secs(a.longest)))
	}
	return fmt.Sprintf("%d made to a peer on the same node, one a second, the heal at %s: ", len(sends), secs(cut)) + strings.Join(parts, "; ")
}

func secs(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }

// WriteMarkdown prints the table.
func (res *Result) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s; %s; CLUSTER_PROFILE=%s; %s.", res.Date.Format("2006-01-02 15:04 MST"), res.Topology, res.Profile, res.Machine)
	if res.Note != "" {
		fmt.Fprintf(&b, " %s", res.Note)
	}
	b.WriteString("\n\n| path | measured | what the wire allows | target (issue 14) | holds |\n|---|---|---|---|---|\n")
	for _, r := range res.Rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.Path, r.Measured, r.Wire, r.Target, r.Holds)
	}
	var notYet []string
	for _, c := range res.Checks {
		if !c.Holds {
			notYet = append(notYet, fmt.Sprintf("%s[%s] %.0f ms > %.0f ms", c.Threshold, c.Key, c.Measured, c.Bound))
		}
	}
	if len(notYet) > 0 {
		fmt.Fprintf(&b, "\nNot yet within target: %s.\n", strings.Join(notYet, "; "))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON writes the result as one line of JSON.
func (res *Result) WriteJSON(w io.Writer) error {
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
