// Package bench is meshbench's engine: a load generator for a claudemesh
// broker cluster that measures what a peer sees.
//
// Every run seeds a fresh mesh through the broker's admin path, gives each
// member a real ed25519 key and connects it with a signed hello, like a
// real client. Messaging runs prepare every envelope before the timed
// phase (real crypto_box or crypto_secretbox ciphertexts, marshalled send
// frames), then only write and read: the generator measures the broker,
// not its own crypto. Recipients announce client_ack and acknowledge every
// push, so a redelivery shows up as a duplicate. Every (message,
// recipient) pair is accounted exactly once: delivered, duplicated or
// missing. Each node's resident memory and open descriptors are sampled
// throughout. At the end the run deletes its meshes again.
//
// Modes:
//
//   - burst: each of N peers sends M direct messages to random other peers
//     as fast as its socket takes them (pipelined, not waiting for acks).
//   - broadcast: each peer sends M messages to "*"; each reaches N−1 peers.
//   - rate: open loop at R messages/s over all peers for a duration; every
//     latency is measured from the message's intended send time, so a
//     stalled broker cannot hide its delay by slowing the sender down
//     (no coordinated omission).
//   - conns: N idle connections; the hello rate (dial + signed hello +
//     hello_ack) and each node's memory per connection.
package bench

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/store"
)

// Mode selects the workload.
type Mode string

// Modes.
const (
	ModeBurst     Mode = "burst"
	ModeBroadcast Mode = "broadcast"
	ModeRate      Mode = "rate"
	ModeConns     Mode = "conns"
)

// Target is one broker node.
type Target struct {
	Name string // label in the report; "node-<i>" when empty
	URL  string // ws://host:port/ws
	// PID, when set, is the node's process on this machine: its memory and
	// descriptors are read from /proc. Otherwise they are scraped from the
	// node's /metrics (process_resident_memory_bytes, process_open_fds).
	PID int
	// MetricsURL is where that /metrics is served; empty means on the
	// node's own port (a node with METRICS_ADDR serves it elsewhere).
	MetricsURL string
}

// Options configure a run. Zero values are replaced by the documented
// defaults.
type Options struct {
	Mode    Mode
	Targets []Target
	// PostgresPID, when set, is the cluster's Postgres postmaster on this
	// machine: the CPU time of it and its backends is reported.
	PostgresPID int
	// Nodes is how many of the targets receive peers (the first Nodes);
	// zero means all. Every target is sampled either way.
	Nodes int
	// DatabaseURL is the cluster's Postgres; meshes and members are
	// created (and deleted) through the broker's admin functions.
	DatabaseURL string

	Peers    int // burst, broadcast, rate: peers (mesh members); default 10
	Messages int // burst, broadcast: messages per peer; default 100
	Size     int // plaintext bytes per message; default 256

	Rate     float64       // rate: messages per second over all peers (required)
	Duration time.Duration // rate: length of the sending phase (required)

	Conns             int           // conns: connections to open (required)
	SessionsPerMember int           // conns: sessions sharing one member; default 10
	ConnsPerMesh      int           // conns: connections per mesh; zero means one mesh
	Concurrency       int           // dials in flight; default 64
	Hold              time.Duration // conns: idle time before the memory reading; default 5s

	// DrainTimeout bounds the wait for outstanding acks and pushes after
	// the last send; default 60s.
	DrainTimeout time.Duration
	// Settle is how long to keep listening for late duplicates once every
	// expected push arrived; default 1s, negative for none.
	Settle time.Duration
	// StatsWait is how long Postgres' statistics must stand still after
	// the drain before they are read for the run's row writes and
	// transactions (PGWrites), at most 6 times as long; default 11s,
	// negative for no reading.
	StatsWait time.Duration
	// PGStatements, when positive, reports that many statements, those
	// that took Postgres the most execution time during the timed phase
	// (pg_stat_statements, which the server must preload: SpawnOptions.
	// PGStatements; the extension is created if missing). Needs the
	// statistics reading (StatsWait not negative).
	PGStatements int
	// SampleInterval is the RSS/FD sampling period; default 250ms.
	SampleInterval time.Duration
	// Seed makes the random targets reproducible; zero picks one.
	Seed uint64
	// Keep leaves the meshes in the database.
	Keep bool

	Progress io.Writer         // progress bar destination; nil for none
	Logger   *slog.Logger      // default: discard
	Meta     map[string]string // copied to the result (cluster, commit, command line)
}

func (o *Options) normalize() error {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&o.Peers, 10)
	def(&o.Messages, 100)
	def(&o.Size, 256)
	def(&o.SessionsPerMember, 10)
	def(&o.Concurrency, 64)
	defD := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	defD(&o.Hold, 5*time.Second)
	defD(&o.DrainTimeout, 60*time.Second)
	defD(&o.Settle, time.Second)
	defD(&o.SampleInterval, 250*time.Millisecond)
	defD(&o.StatsWait, 11*time.Second)
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	for i := range o.Targets {
		if o.Targets[i].Name == "" {
			o.Targets[i].Name = fmt.Sprintf("node-%d", i+1)
		}
	}
	if o.Nodes == 0 || o.Nodes > len(o.Targets) {
		o.Nodes = len(o.Targets)
	}

	var bad []string
	if len(o.Targets) == 0 {
		bad = append(bad, "no broker URL")
	}
	if o.Nodes < 0 {
		bad = append(bad, fmt.Sprintf("nodes %d is negative", o.Nodes))
	}
	for _, t := range o.Targets {
		if !strings.HasPrefix(t.URL, "ws://") && !strings.HasPrefix(t.URL, "wss://") {
			bad = append(bad, fmt.Sprintf("%q is not a ws:// or wss:// URL", t.URL))
		}
	}
	if o.DatabaseURL == "" {
		bad = append(bad, "no database URL (seeding goes through the admin path)")
	}
	if o.Size < 1 || o.Size > 60_000 {
		bad = append(bad, fmt.Sprintf("size %d is outside 1..60000 bytes", o.Size))
	}
	if o.Concurrency < 1 || o.Concurrency > 10_000 {
		bad = append(bad, fmt.Sprintf("concurrency %d is outside 1..10000", o.Concurrency))
	}
	switch o.Mode {
	case ModeBurst, ModeBroadcast:
		if o.Messages < 1 {
			bad = append(bad, "messages must be at least 1")
		}
	case ModeRate:
		if o.Rate <= 0 || math.IsInf(o.Rate, 0) || math.IsNaN(o.Rate) {
			bad = append(bad, "rate mode needs a positive rate")
		}
		if o.Duration <= 0 {
			bad = append(bad, "rate mode needs a positive duration")
		}
	case ModeConns:
		if o.Conns < 1 {
			bad = append(bad, "conns mode needs a number of connections")
		}
		if o.SessionsPerMember < 1 || o.ConnsPerMesh < 0 {
			bad = append(bad, "sessions per member must be ≥ 1 and connections per mesh ≥ 0")
		}
	default:
		bad = append(bad, fmt.Sprintf("unknown mode %q (burst, broadcast, rate, conns)", o.Mode))
	}
	if o.Mode != ModeConns && (o.Peers < 2 || o.Peers > 100_000) {
		bad = append(bad, fmt.Sprintf("peers %d is outside 2..100000", o.Peers))
	}
	if len(bad) > 0 {
		return errors.New("meshbench: " + strings.Join(bad, "; "))
	}
	return nil
}

// Params echo the run's settings in the result.
type Params struct {
	Peers             int     `json:"peers,omitempty"`
	Messages          int     `json:"messagesPerPeer,omitempty"`
	Size              int     `json:"sizeBytes,omitempty"`
	Rate              float64 `json:"ratePerSec,omitempty"`
	DurationSec       float64 `json:"durationSec,omitempty"`
	Conns             int     `json:"conns,omitempty"`
	SessionsPerMember int     `json:"sessionsPerMember,omitempty"`
	ConnsPerMesh      int     `json:"connsPerMesh,omitempty"`
	Concurrency       int     `json:"concurrency,omitempty"`
	HoldSec           float64 `json:"holdSec,omitempty"`
	Nodes             int     `json:"nodes"` // targets that received peers
	DrainTimeoutSec   float64 `json:"drainTimeoutSec,omitempty"`
	SettleSec         float64 `json:"settleSec,omitempty"`
	Seed              uint64  `json:"seed,omitempty"`
}

// Timing describes the phases of a messaging run.
type Timing struct {
	PrepareSec       float64 `json:"prepareSec"`       // sealing and marshalling every envelope
	ConnectSec       float64 `json:"connectSec"`       // dials, hellos and presence convergence
	SendSec          float64 `json:"sendSec"`          // first to last send written
	DrainedInSec     float64 `json:"drainedInSec"`     // first send to last push
	Drained          bool    `json:"drained"`          // every expected ack and push arrived in time
	SendsPerSec      float64 `json:"sendsPerSec"`      // sent / SendSec
	DeliveriesPerSec float64 `json:"deliveriesPerSec"` // delivered / DrainedInSec
}

// Result is everything a run measured.
type Result struct {
	Mode        Mode      `json:"mode"`
	StartedAt   time.Time `json:"startedAt"`
	Params      Params    `json:"params"`
	Meshes      []string  `json:"meshes"`
	MeshesKept  bool      `json:"meshesKept,omitempty"`
	CleanupSec  float64   `json:"cleanupSec"` // deleting the meshes through the admin path
	Interrupted bool      `json:"interrupted,omitempty"`

	Delivery *Delivery `json:"delivery,omitempty"`
	Timing   *Timing   `json:"timing,omitempty"`
	// LatencyFrom says where send→ack and send→push start: the write of
	// the send frame, or (rate mode) its intended send time.
	LatencyFrom string   `json:"latencyFrom,omitempty"`
	SendToAck   *Latency `json:"sendToAck,omitempty"`
	SendToPush  *Latency `json:"sendToPush,omitempty"`
	// SendToPushSameNode and SendToPushCrossNode split SendToPush by
	// whether sender and recipient were connected to the same node
	// (multi-node runs).
	SendToPushSameNode  *Latency `json:"sendToPushSameNode,omitempty"`
	SendToPushCrossNode *Latency `json:"sendToPushCrossNode,omitempty"`
	// DuplicateAfter is, for each duplicate push, the time since the
	// first push of the same message to the same peer: about the lease
	// duration for redeliveries after a lost client_ack, less for a
	// message claimed twice.
	DuplicateAfter *Latency `json:"duplicateAfter,omitempty"`
	// SendLag is how late the generator wrote sends against their
	// schedule (rate mode): large values mean the generator or the socket
	// could not keep up, and are included in the latencies above.
	SendLag *Latency `json:"sendLag,omitempty"`

	Conns *ConnsResult `json:"conns,omitempty"`

	// PGWrites is Postgres' row writes and transactions during the timed
	// phase (messaging runs).
	PGWrites *PGWrites `json:"postgresWrites,omitempty"`

	Nodes     []NodeStats       `json:"nodes"`
	Generator NodeStats         `json:"generator"`
	Postgres  *NodeStats        `json:"postgres,omitempty"` // CPU only
	Host      HostStats         `json:"host"`
	Machine   Machine           `json:"machine"`
	Meta      map[string]string `json:"meta,omitempty"`
	Notes     []string          `json:"notes,omitempty"`

	samples latencies // raw samples, for the plot
}

// disturbed is the average number of cores other processes may use before
// a run is flagged as disturbed.
const disturbed = 0.1

// Run seeds, runs one workload against the targets, and cleans up. It
// returns the result even when the run is interrupted (ctx cancelled), with
// Interrupted set and ctx's error.
func Run(ctx context.Context, o Options) (Result, error) {
	if err := o.normalize(); err != nil {
		return Result{}, err
	}
	res := Result{Mode: o.Mode, StartedAt: time.Now().UTC(), Machine: ReadMachine(), Meta: o.Meta,
		Params: Params{Nodes: o.Nodes, Seed: o.Seed, Size: o.Size, Concurrency: o.Concurrency}}

	// One HTTP client for /metrics scrapes, without keep-alive so that no
	// idle connection (and its goroutines) outlives the run.
	httpc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	smp, err := newSampler(o.Targets, o.PostgresPID, httpc)
	if err != nil {
		return Result{}, err
	}
	st, err := store.Open(ctx, o.DatabaseURL, 8)
	if err != nil {
		return Result{}, err
	}
	defer st.Close()
	if err := st.Ping(ctx); err != nil {
		return Result{}, fmt.Errorf("database: %w", err)
	}
	smp.start(o.SampleInterval)
	if o.Mode == ModeConns {
		err = runConns(ctx, o, st, smp, &res)
	} else {
		err = runMessages(ctx, o, st, &res)
	}
	res.Nodes, res.Generator, res.Postgres, res.Host = smp.stop()
	if h := res.Host; h.WallSeconds > 0 && h.OthersCPUSeconds/h.WallSeconds > disturbed {
		res.Notes = append(res.Notes, fmt.Sprintf("disturbed: processes outside the benchmark used %.2f cores on average during the run",
			h.OthersCPUSeconds/h.WallSeconds))
	}
	if ctx.Err() != nil {
		res.Interrupted = true
	}
	return res, err
}

// cleanup deletes the run's meshes unless they are to be kept.
func cleanup(o Options, st *store.Store, res *Result) {
	if o.Keep {
		res.MeshesKept = true
		return
	}
	start := time.Now()
	retries, err := deleteMeshes(st, res.Meshes)
	res.CleanupSec = time.Since(start).Seconds()
	if retries > 0 {
		res.Notes = append(res.Notes, fmt.Sprintf("cleanup: deleting the mesh lost %d deadlock(s) against the nodes' own writes and was retried", retries))
	}
	if err != nil {
		o.Logger.Warn("cleanup failed", "err", err)
		res.Notes = append(res.Notes, "cleanup failed: "+err.Error())
	}
}

// runMessages runs burst, broadcast and rate.
func runMessages(ctx context.Context, o Options, st *store.Store, res *Result) (err error) {
	res.Params.Peers = o.Peers
	res.Params.DrainTimeoutSec = o.DrainTimeout.Seconds()
	res.Params.SettleSec = max(o.Settle, 0).Seconds()
	p := plan{size: o.Size, seed: o.Seed, broadcast: o.Mode == ModeBroadcast}
	if o.Mode == ModeRate {
		p.rate, p.duration = o.Rate, o.Duration
		res.Params.Rate, res.Params.DurationSec = o.Rate, o.Duration.Seconds()
	} else {
		p.perPeer = o.Messages
		res.Params.Messages = o.Messages
	}
	if p.seed == 0 {
		p.seed = uint64(time.Now().UnixNano())
		res.Params.Seed = p.seed
	}

	mesh, err := seedMesh(ctx, st, fmt.Sprintf("meshbench %s %s", o.Mode, time.Now().UTC().Format(time.RFC3339)), o.Peers, 8)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	res.Meshes = []string{mesh.meshID}
	defer cleanup(o, st, res)
	o.Logger.Info("mesh seeded", "mesh", mesh.meshID, "members", o.Peers)

	t0 := time.Now()
	p.keys = make([]ed25519.PrivateKey, o.Peers)
	for i, id := range mesh.members {
		p.keys[i] = id.Priv
	}
	p.meshKey = mesh.meshKey
	w, err := prepare(p)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	timing := &Timing{PrepareSec: time.Since(t0).Seconds()}
	res.Timing = timing
	l := newLedger(w)

	t1 := time.Now()
	urls := make([]string, o.Nodes)
	for i := range urls {
		urls[i] = o.Targets[i].URL
	}
	peers, err := dialAll(ctx, urls, mesh.members, min(o.Concurrency, 32))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	for _, pr := range peers {
		pr.run(ctx, l)
	}
	defer closePeers(peers)
	if err := waitPresence(ctx, peers, o.Nodes, o.Peers, 30*time.Second); err != nil {
		return err
	}
	timing.ConnectSec = time.Since(t1).Seconds()

	expected := int64(w.messages()) * int64(w.fanout())
	desc := fmt.Sprintf("%s %d peers", o.Mode, o.Peers)
	bar := startProgress(o.Progress, desc, expected, func() (int64, string) {
		return l.delivered.Load(), fmt.Sprintf(", sent %d/%d, delivered", l.sentCount.Load(), w.messages())
	})
	defer bar.finish()

	var pgs *pgStats
	if o.StatsWait >= 0 {
		if pgs, err = startPGStats(ctx, o.DatabaseURL, o.PGStatements); err != nil {
			res.Notes = append(res.Notes, err.Error())
		}
	}
	l.begin()
	sendErrs := make([]error, len(peers))
	var wg sync.WaitGroup
	for _, pr := range peers {
		wg.Go(func() { sendErrs[pr.index] = pr.send(ctx, l, w.bySender[pr.index]) })
	}
	wg.Wait()
	sendEnd := l.now()
	if err := errors.Join(sendErrs...); err != nil && ctx.Err() == nil {
		res.Notes = append(res.Notes, firstLines("send failed: "+err.Error(), 5))
	}

	drain := time.NewTimer(o.DrainTimeout)
	defer drain.Stop()
	select {
	case <-l.Done():
		timing.Drained = true
	case <-drain.C:
		res.Notes = append(res.Notes, fmt.Sprintf("not drained %s after the last send", o.DrainTimeout))
	case <-ctx.Done():
	}
	if timing.Drained && o.Settle > 0 {
		settle := time.NewTimer(o.Settle)
		select {
		case <-settle.C:
		case <-ctx.Done():
		}
		settle.Stop()
	}
	bar.finish()

	fctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, pr := range peers {
		wg.Go(func() { _ = pr.flush(fctx) })
	}
	wg.Wait()

	d := l.delivery()
	if pgs != nil {
		pw, err := pgs.finish(ctx, o.StatsWait, 6*o.StatsWait, d.Delivered)
		if err != nil {
			res.Notes = append(res.Notes, err.Error())
		} else if res.PGWrites = pw; pw.StatsResetMidst {
			res.Notes = append(res.Notes, "pg stats: a counter went backwards (statistics reset during the run)")
		}
	}
	d.CrossNodePct = w.crossNodePct(o.Nodes)
	res.Delivery = &d
	lat := l.latencies(o.Nodes)
	res.samples = lat
	res.LatencyFrom = "write of the send frame"
	if w.scheduled {
		res.LatencyFrom = "intended send time (open loop: a late send counts against the broker; no coordinated omission)"
		sl := Summarize(lat.sendLag)
		res.SendLag = &sl
	}
	if len(lat.dupAfter) > 0 {
		da := Summarize(lat.dupAfter)
		res.DuplicateAfter = &da
	}
	ack, push := Summarize(lat.sendToAck), Summarize(lat.sendToPush)
	res.SendToAck, res.SendToPush = &ack, &push
	if o.Nodes > 1 {
		same, cross := Summarize(lat.sameNode), Summarize(lat.crossNode)
		res.SendToPushSameNode, res.SendToPushCrossNode = &same, &cross
	}
	phase := l.phase
	if lat.firstSend > 0 {
		timing.SendSec = float64(sendEnd-lat.firstSend) / 1e9
		if lat.lastPush > 0 {
			timing.DrainedInSec = float64(lat.lastPush-lat.firstSend) / 1e9
		}
	} else {
		timing.SendSec = float64(sendEnd-phase) / 1e9
	}
	if timing.SendSec > 0 {
		timing.SendsPerSec = float64(d.Sent) / timing.SendSec
	}
	if timing.DrainedInSec > 0 {
		timing.DeliveriesPerSec = float64(d.Delivered) / timing.DrainedInSec
	}
	return ctx.Err()
}

// waitPresence waits until, on every node that has peers, list_peers
// shows all want sessions: the gossip replica has converged, so a send to
// a peer on another node is routed at once rather than found by the
// periodic sweep.
func waitPresence(ctx context.Context, peers []*peer, nodes, want int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for node := range nodes {
		var asker *peer
		for _, p := range peers {
			if p.node == node {
				asker = p
				break
			}
		}
		if asker == nil {
			continue
		}
		for attempt := 0; ; attempt++ {
			n, err := asker.listPeers(ctx, fmt.Sprintf("presence-%d-%d", node, attempt))
			if err != nil {
				return fmt.Errorf("presence on node %d: saw %d of %d peers: %w", node+1, n, want, err)
			}
			if n >= want {
				break
			}
			retry := time.NewTimer(100 * time.Millisecond)
			select {
			case <-retry.C:
			case <-ctx.Done():
				retry.Stop()
				return fmt.Errorf("presence on node %d: saw %d of %d peers: %w", node+1, n, want, ctx.Err())
			}
		}
	}
	return nil
}

// closePeers closes every connection in parallel and waits for their
// goroutines.
func closePeers(peers []*peer) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, p := range peers {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			p.close()
		})
	}
	wg.Wait()
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = append(lines[:n], "…")
	}
	return strings.Join(lines, "; ")
}
