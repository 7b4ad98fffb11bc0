package delivery

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/startstop"
	"github.com/claudemesh/broker/internal/testsignal"
)

// Config sets the engine's rules.
type Config struct {
	Node        string // this node's name
	Incarnation int64  // this run of it (its start time)
	// LeaseDuration bounds how long a row stays leased to a session that
	// neither acks nor releases it.
	LeaseDuration time.Duration
	MessageTTL    time.Duration
	// SweepInterval is the period of the safety re-scan for rows of local
	// sessions that no notification announced.
	SweepInterval time.Duration
	// DisableRemoteFastPath sends every cross-node row through a claim.
	DisableRemoteFastPath bool
	// CommitShards is the number of group-commit workers (zero means 2).
	CommitShards int
	// StatementTimeout bounds one claim or delivery-mark statement (zero
	// means 10 s); one that runs out of it makes the next ones smaller
	// (claim.go, ack.go).
	StatementTimeout time.Duration
	// Now is the cluster's clock (this node's corrected by its offset from
	// Postgres); nil means time.Now.
	Now func() time.Time
}

// Deps are the engine's collaborators.
type Deps struct {
	Queue     Queue
	Directory Directory
	Notifier  Notifier
	Auditor   Auditor
	Metrics   *metrics.Metrics
	Logger    *slog.Logger
	// Liveness, when set, lets sessions that attach here take over the
	// leases of nodes that do not answer (takeover.go); nil: no takeover.
	Liveness Liveness
}

// TestSignals are the engine's events a test may wait for instead of
// polling metrics (testsignal). Production never turns them on.
type TestSignals struct {
	ClaimRound testsignal.Signal[ClaimRound] // a claim round ended
	Committed  testsignal.Signal[int]        // a group commit of n messages committed
	Settled    testsignal.Signal[int]        // a group commit of n messages settled (acked, pushed, woken)
	Listening  testsignal.Signal[struct{}]   // the relay listener (re)listens
	Marked     testsignal.Signal[int]        // n rows were marked delivered
	Expired    testsignal.Signal[int]        // n rows expired
	// ClaimShrunk: a claim ran out of time; the claim budget is now n rows.
	ClaimShrunk testsignal.Signal[int]
}

// ClaimRound reports one claim round.
type ClaimRound struct {
	Members int  // members claimed for
	Rows    int  // rows leased
	Failed  bool // the queue failed; the round is retried
}

// Engine moves rows from the queue to this node's sessions. It has one
// lifecycle (Start, Stop); its parts stop in dependency order.
type Engine struct {
	cfg       Config
	leaseNode string // name#incarnation, written on every lease
	q         Queue
	dir       Directory
	notifier  Notifier
	audit     Auditor
	m         *metrics.Metrics
	logger    *slog.Logger
	now       func() time.Time
	live      Liveness

	loops    startstop.Base // the claim loop, expiry, start-up release
	releases startstop.Base // lease releases in flight
	commit   *committer
	acks     *acker
	signal   chan struct{}

	// TestSignals are off unless a test turns them on.
	TestSignals TestSignals

	mu      sync.Mutex
	members map[string]*localMember
	// taken holds rows leased to this node by the remote fast path that
	// were handled once: pushed from their envelope, or taken by a claim
	// straight from that lease (a sweep, or a claim for the member's other
	// rows) before the envelope arrived. The row stays claimable by this
	// node until something else leases it, so whichever comes second (the
	// envelope, or a claim that read the row before its delivery mark
	// committed) must not push it again. Entries are dropped after
	// takenTTL, far longer than an envelope's delay or a claim's timeout.
	taken map[Key]time.Time
	// silent holds the nodes that stopped answering this one (NodeReach).
	silent map[string]struct{}
	// claimBudget bounds the rows one claim statement asks for (claim.go;
	// zero until the first claim: maxClaimRows).
	claimBudget int
	claimStreak int // claim statements finished in a row since the budget last changed
}

var _ startstop.Service = (*Engine)(nil)

const takenTTL = 2 * time.Minute

// maxTaken bounds the set of rows handled by a fast path (e.taken, about
// 100 bytes an entry: ~26 MiB full). At its bound the fast paths leave
// rows to a claim, which needs no entry to stay exactly once; a claim's
// own entries (rows a remote fast path leased) are always recorded.
const maxTaken = 1 << 18

// takenFull reports, with e.mu held, whether the fast paths must leave a
// row to a claim because e.taken is at its bound; it counts each refusal.
func (e *Engine) takenFull() bool {
	if len(e.taken) < maxTaken {
		return false
	}
	e.m.HandledFull.Inc()
	return true
}

// LeaseNodeName is what a lease records as its node: the node's name and
// incarnation, so that a restarted node's leases can be told from its
// predecessor's.
func LeaseNodeName(node string, incarnation int64) string {
	return LeaseNodePrefix(node) + strconv.FormatInt(incarnation, 10)
}

// LeaseNodePrefix starts the lease node names of every incarnation of node.
func LeaseNodePrefix(node string) string { return node + "#" }

// New makes an engine; Start runs it.
func New(cfg Config, d Deps) *Engine {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CommitShards <= 0 {
		cfg.CommitShards = 2
	}
	if cfg.StatementTimeout <= 0 {
		cfg.StatementTimeout = 10 * time.Second
	}
	e := &Engine{
		cfg: cfg, leaseNode: LeaseNodeName(cfg.Node, cfg.Incarnation),
		q: d.Queue, dir: d.Directory, notifier: d.Notifier, audit: d.Auditor, m: d.Metrics, logger: d.Logger,
		now: cfg.Now, signal: make(chan struct{}, 1), live: d.Liveness,
		members: map[string]*localMember{}, taken: map[Key]time.Time{}, silent: map[string]struct{}{},
	}
	e.commit = newCommitter(e, cfg.CommitShards)
	e.acks = newAcker(e)
	return e
}

// LeaseNode is this node incarnation's lease name.
func (e *Engine) LeaseNode() string { return e.leaseNode }

// Start launches the claim loop, the group-commit workers, the acker and
// expiry, and releases the leases an earlier incarnation of this node left.
func (e *Engine) Start(ctx context.Context) error {
	run, ok := e.loops.StartInit(ctx)
	if !ok {
		return nil
	}
	e.releases.StartInit(run)
	if err := e.acks.Start(run); err != nil {
		return err
	}
	if err := e.commit.Start(run); err != nil {
		return err
	}
	e.loops.Go(e.claimLoop)
	e.loops.Go(e.expiryLoop)
	// Leases held by an earlier incarnation of this node are void.
	e.loops.Go(func(ctx context.Context) {
		e.ReleaseNodeLeases(ctx, EscapeLike(LeaseNodePrefix(e.cfg.Node))+"%", e.leaseNode)
	})
	return nil
}

// Stop commits the sends already accepted (new ones are refused as
// unavailable), lets the lease releases in flight finish, writes the
// pending delivery marks and stops, bounded by ctx. The sessions should be
// gone first: what they hand back is released only until then.
func (e *Engine) Stop(ctx context.Context) {
	e.commit.Stop(ctx)
	e.loops.Stop(ctx)
	e.releases.Stop(ctx)
	e.acks.Stop(ctx)
}

// Stopped is closed once every part has stopped.
func (e *Engine) Stopped() bool {
	for _, b := range []*startstop.Base{&e.commit.Base, &e.loops, &e.releases, &e.acks.Base} {
		select {
		case <-b.Stopped():
		default:
			return false
		}
	}
	return true
}

// Abort stops as a crash would: nothing queued is committed or marked.
func (e *Engine) Abort() {
	e.commit.abandon.Store(true)
	e.acks.abandon.Store(true)
	e.Stop(context.Background())
}

// Kick asks for a claim round (a session's writer made room).
func (e *Engine) Kick() {
	select {
	case e.signal <- struct{}{}:
	default:
	}
}

// Submit hands a send to the group commit; it blocks while the commit
// worker is full, which back-pressures the sender's read loop. The sender
// is answered once the send committed or failed.
func (e *Engine) Submit(s *Send) { e.commit.submit(s) }

// Delivered queues rows of one mesh to be marked delivered: client_acks,
// and pushes written to sessions without client_ack. Call it before the
// session forgets the row (Unreserve): a claim in between must find the
// row in one set or the other, never in neither.
func (e *Engine) Delivered(mesh string, keys ...Key) { e.acks.add(mesh, keys...) }

func (e *Engine) expiryLoop(ctx context.Context) {
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			e.Expire(ctx)
		}
	}
}

// Expire marks rows past MESSAGE_TTL expired, in passes of a bounded size.
func (e *Engine) Expire(ctx context.Context) {
	const pass = 5000
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rows, err := e.q.ExpireDue(cctx, &ExpireParams{Limit: pass})
		cancel()
		if err != nil || len(rows) == 0 {
			return
		}
		e.m.MessagesExpired.Add(float64(len(rows)))
		for _, r := range rows {
			e.audit.MessageExpired(r.MeshID, r.MemberID, r.MessageID)
		}
		e.TestSignals.Expired.Signal(len(rows))
		if len(rows) < pass {
			return
		}
	}
}
