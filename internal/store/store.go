// Package store is the broker's Postgres adapter: migrations, meshes and
// members, invites, the message queue (messages and per-recipient delivery
// rows), hello replay protection, pending hook statuses, audit events and the
// node registry. Postgres is the source of truth for messages; every
// function here is safe for concurrent use by several nodes.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/oklog/ulid/v2"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	migrations "github.com/claudemesh/broker/sql"
)

// Errors callers map to wire codes or HTTP statuses.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("already exists")
)

// Store wraps two pgx connection pools. pool commits synchronously: what
// it writes (messages, members, invites, accepted hellos) is durable before
// the call returns. fast commits asynchronously (synchronous_commit=off):
// leases, delivery marks, notifications and audit events, whose loss in a
// Postgres crash costs at most a redelivery, not an acknowledged message.
// Not waiting for the WAL flush there takes a commit's fsync off the
// delivery path.
type Store struct {
	pool *pgxpool.Pool
	fast *pgxpool.Pool
	// probe is one connection of its own for the health check (Now), so
	// that a probe that times out (Postgres unreachable; pgx then closes
	// the connection, its state unknown) closes no connection of the
	// pools: those of a path to Postgres that stalled and heals serve
	// again as it heals, without being reopened.
	probe *pgxpool.Pool
	// poolSize, fastSize: the connections each pool keeps open.
	poolSize, fastSize int32
	// envInner, envOuter seal envelope notifications (relaykey.go).
	envInner, envOuter []byte
}

// Option adjusts Open.
type Option func(*options)

type options struct {
	tracer pgx.QueryTracer
}

// WithTracer sets a pgx tracer on every connection of the store; the
// interfaces it implements beyond pgx.QueryTracer (pgx.ConnectTracer,
// pgx.PrepareTracer, pgxpool.AcquireTracer, …) are called too. Tests watch
// with it what the pools do: connections opened, statements prepared.
func WithTracer(t pgx.QueryTracer) Option { return func(o *options) { o.tracer = t } }

// Open connects the pools to url with maxConns connections in all, plus
// the health check's. Each pool opens all its connections at once, in the
// background, and keeps them open: a node far from Postgres would
// otherwise open them on its first requests, several round trips each
// (Warm waits for them). Open does not fail when Postgres is down, so that
// a node can start and report itself degraded; the pools connect when it
// is back.
func Open(ctx context.Context, url string, maxConns int, opts ...Option) (*Store, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if maxConns < 4 {
		maxConns = 4
	}
	syncConns := maxConns - maxConns/4
	pool, err := newPool(ctx, url, syncConns, "claudemesh-broker", sessionSettings(), onSync, o)
	if err != nil {
		return nil, err
	}
	fast, err := newPool(ctx, url, maxConns-syncConns, "claudemesh-broker-async", sessionSettings("synchronous_commit", "off"), onFast, o)
	if err != nil {
		pool.Close()
		return nil, err
	}
	probe, err := newPool(ctx, url, 1, "claudemesh-broker-probe", sessionSettings(), onProbe, o)
	if err != nil {
		pool.Close()
		fast.Close()
		return nil, err
	}
	return &Store{pool: pool, fast: fast, probe: probe, poolSize: int32(syncConns), fastSize: int32(maxConns - syncConns)}, nil
}

// sessionSettings are the settings of every connection of the store, with
// extra name, value pairs added.
//
// Every query of the broker is written to be driven by an index. While
// a table grows from empty faster than autovacuum refreshes its
// statistics, the planner believes it tiny and scans it whole, each
// scan a little longer: a queue that fills up in a minute would crawl.
// Sequential scans are therefore a last resort on the broker's
// connections (they still happen where no index serves).
//
// The statements are prepared once per connection and their plans do
// not depend on the parameter values (arrays unnested into index
// lookups), yet Postgres re-plans a prepared statement for every
// execution while its custom plans look cheaper than the generic one.
// Planning the CTEs of an insert or a claim was a large share of
// Postgres' CPU at moderate rates; a generic plan is made once.
// Measured with meshbench rate -n 100 --rate 2000 over 3 nodes: send→push
// p50 13 → 8.8 ms, Postgres CPU per message 0.51 → 0.46 ms.
//
// JIT compilation is off. Postgres compiles a plan whose estimated
// cost passes jit_above_cost, and with inlining and optimisation past
// 500,000; a plan left with a sequential scan carries the 10^10 that
// enable_seqscan=off adds, so the node registry's scan of a handful of
// rows (RecentNodes) was compiled on every run: 110 ms of Postgres CPU
// each, 7 times in a 100 × 1000 burst on one node (pg_stat_statements
// jit_* times: 764 ms of compilation for 759 ms of execution). No
// statement of the broker runs long enough to repay a compilation.
func sessionSettings(extra ...string) map[string]string {
	m := map[string]string{"enable_seqscan": "off", "plan_cache_mode": "force_generic_plan", "jit": "off"}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

func newPool(ctx context.Context, url string, maxConns int, app string, params map[string]string, kind poolKind, o options) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse DATABASE_URL: %w", err)
	}
	cfg.MaxConns = int32(maxConns)
	// All connections stay open (none is closed for being idle), so that
	// no request waits for one to be opened; DB_POOL_SIZE is sized
	// against Postgres' max_connections anyway.
	cfg.MinConns = cfg.MaxConns
	// Connections are still replaced after MaxConnLifetime (pgx's hour);
	// spread out, so that the pool replaces one at a time, in the
	// background, while the others serve.
	cfg.MaxConnLifetimeJitter = 10 * time.Minute
	// The pool's own check (idle and expired connections, reopening to
	// MinConns) is local work, no round trip: run it often, so that a
	// connection lost is reopened within a second.
	cfg.HealthCheckPeriod = time.Second
	cfg.ShouldPing = checkIdle
	cfg.AfterConnect = prepareHot(kind)
	cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	if o.tracer != nil {
		cfg.ConnConfig.Tracer = o.tracer
	}
	if cfg.ConnConfig.RuntimeParams == nil {
		cfg.ConnConfig.RuntimeParams = map[string]string{}
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	for k, v := range params {
		cfg.ConnConfig.RuntimeParams[k] = v
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("create pool: %w", err)
	}
	return pool, nil
}

// Pool exposes the synchronous pool (tests terminate its connections).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Close closes the pools.
func (s *Store) Close() {
	s.pool.Close()
	s.fast.Close()
	s.probe.Close()
}

// Now returns Postgres' clock: the health check, on its own connection.
// One round trip (the simple protocol: nothing to prepare).
func (s *Store) Now(ctx context.Context) (time.Time, error) {
	var t time.Time
	err := s.probe.QueryRow(ctx, "SELECT now()", pgx.QueryExecModeSimpleProtocol).Scan(&t)
	return t, err
}

// Ping checks that Postgres answers, on the health check's connection.
func (s *Store) Ping(ctx context.Context) error {
	_, err := s.probe.Exec(ctx, "SELECT 1")
	return err
}

// Migrate applies the embedded migrations under a session advisory lock so
// that nodes starting together migrate exactly once. It returns the
// versions it applied.
func Migrate(ctx context.Context, url string) ([]int64, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse DATABASE_URL: %w", err)
	}
	db := stdlib.OpenDB(*cfg)
	defer db.Close()
	return migrateDB(ctx, db)
}

func migrateDB(ctx context.Context, db *sql.DB) ([]int64, error) {
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 120))
	if err != nil {
		return nil, err
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS,
		goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	res, err := p.Up(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	var applied []int64
	for _, r := range res {
		applied = append(applied, r.Source.Version)
	}
	return applied, nil
}

// NewID returns a new sortable unique id (ULID, 26 characters).
func NewID() string { return strings.ToLower(ulid.Make().String()) }

// IsUnavailable reports whether err means Postgres could not be reached (as
// opposed to a query that Postgres rejected).
func IsUnavailable(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// Class 08: connection exception; 57P: operator intervention (shutdown).
		return strings.HasPrefix(pgErr.Code, "08") || strings.HasPrefix(pgErr.Code, "57P")
	}
	return !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrConflict) && !errors.Is(err, pgx.ErrNoRows)
}

func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505"
}
