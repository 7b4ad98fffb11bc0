package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Hot statements.
//
// A node pays a round trip to Postgres for every exchange with it, and a
// far node pays hundreds of milliseconds for each. pgx prepares a
// statement on a connection the first time that connection runs it
// (QueryExecModeCacheStatement: Parse and Describe, then Bind and Execute:
// two round trips), so on a fresh pool each request's first statements
// cost double, on top of the connection being opened. The statements that
// requests wait for (a hello, a send, a claim, a delivery mark, a lease
// release, a wake-up) are therefore prepared on every connection as its
// pool opens it (AfterConnect, with the SQL as the statement's name: pgx
// then runs a query whose text is a prepared statement's name as that
// statement, one round trip), and the pools keep all their connections
// open (Open, Warm).
//
// A hot statement is declared with hotSync or hotFast, beside the method
// that runs it, as the variable holding its SQL: the method runs that
// variable and AfterConnect prepares it, so the text prepared is the text
// run. A method that runs a statement not declared so still works, and
// prepares it on first use on each connection; TestHotPathsPrepared, which
// runs the hot paths, and the node's TestFirstRequestsPayNoSetUp fail.
//
// Explicitly prepared statements are not dropped by pgx when a query on
// them fails (its statement cache drops an entry on any error, and the
// next use prepares again): a request that fails costs no extra round trip
// on the next. A migration that changes the type of a column a hot
// statement returns makes Postgres refuse that statement on connections
// prepared before it ("cached plan must not change result type") until
// they are replaced (MaxConnLifetime, or a restart of the node, as any
// deploy with a migration does).

// poolKind names the pool a statement runs on.
type poolKind uint8

const (
	onSync  poolKind = iota // Store.pool: synchronous commit
	onFast                  // Store.fast: asynchronous commit
	onProbe                 // Store.probe: the health check (Now), nothing hot
)

type hotStatement struct {
	name string
	pool poolKind
	sql  string
}

// hotStatements is filled by the package's variable declarations (hotSync,
// hotFast), before any function of the package runs.
var hotStatements []hotStatement

// hotSync declares a statement that a request path runs on the
// synchronous pool and returns its SQL.
func hotSync(name, sql string) string { return declareHot(onSync, name, sql) }

// hotFast declares a statement that a request path runs on the
// asynchronous pool and returns its SQL.
func hotFast(name, sql string) string { return declareHot(onFast, name, sql) }

func declareHot(p poolKind, name, sql string) string {
	hotStatements = append(hotStatements, hotStatement{name: name, pool: p, sql: sql})
	return sql
}

// prepareHot returns the AfterConnect hook of pool p: it prepares p's hot
// statements on a new connection, one round trip each, before the pool
// hands the connection out. A statement Postgres refuses (a schema without
// what it names, during a rolling upgrade) is left to be prepared, and to
// fail, where it is run: the connection still serves everything else. Any
// other error means the connection is broken; the pool drops it and opens
// another later.
func prepareHot(p poolKind) func(context.Context, *pgx.Conn) error {
	return func(ctx context.Context, c *pgx.Conn) error {
		for _, st := range hotStatements {
			if st.pool != p {
				continue
			}
			if _, err := c.Prepare(ctx, st.sql, st.sql); err != nil {
				var pgErr *pgconn.PgError
				if errors.As(err, &pgErr) && !c.IsClosed() {
					continue
				}
				return fmt.Errorf("prepare %s: %w", st.name, err)
			}
		}
		return nil
	}
}

// checkIdle is the pools' ShouldPing: whether to ping a connection before
// handing it out. pgx's default pings every connection that was idle for a
// second, a round trip before the request's own; on a far node most
// requests would pay it. A connection idle that long is instead checked
// without a round trip: CheckConn reads, with a 1 ms deadline, what the
// server may have sent meanwhile, and finds a socket the server closed (a
// Postgres restart, a terminated backend). Only then is it pinged, which
// fails, and the pool drops it and takes another. What CheckConn cannot
// see, a path that silently stopped delivering, a ping would only have
// found out by timing out with the request's own deadline.
func checkIdle(_ context.Context, p pgxpool.ShouldPingParams) bool {
	if p.IdleDuration <= time.Second {
		return false
	}
	//lint:ignore SA1019 pgx deprecates CheckConn in favour of Ping "unless on a high latency connection", which is what this is for.
	return p.Conn.PgConn().CheckConn() != nil
}

// warmPoll is how often Warm looks whether a pool has opened all its
// connections: pgxpool opens them in the background and tells nobody.
const warmPoll = 10 * time.Millisecond

// Warm makes both pools ready for requests and returns once they are: idle
// connections whose server has gone (after a Postgres restart, all of
// them) are closed now rather than found broken by a request, and each
// pool holds its full set of connections, open and with the hot statements
// prepared. The pools open missing connections by themselves, in the
// background; Warm waits for them. It fails at once when Postgres does not
// answer, and when ctx ends before the pools are full.
//
// A node warms its store before it serves, and again when Postgres comes
// back after an outage, before /health reports it healthy.
func (s *Store) Warm(ctx context.Context) error {
	for _, p := range []struct {
		name string
		pool *pgxpool.Pool
		size int32
	}{{"synchronous", s.pool, s.poolSize}, {"asynchronous", s.fast, s.fastSize}, {"health check's", s.probe, 1}} {
		if err := warmPool(ctx, p.pool, p.size); err != nil {
			return fmt.Errorf("warm the %s pool: %w", p.name, err)
		}
	}
	return nil
}

func warmPool(ctx context.Context, p *pgxpool.Pool, size int32) error {
	for _, c := range p.AcquireAllIdle(ctx) {
		//lint:ignore SA1019 see checkIdle.
		if c.Conn().PgConn().CheckConn() != nil {
			_ = c.Conn().Close(ctx) // a closed connection is dropped on release
		}
		c.Release()
	}
	if err := p.Ping(ctx); err != nil {
		// A connection the check above did not hold (the pool's own health
		// check had it) can still carry the server's goodbye: the Ping
		// that got it closed it; the next one tells whether Postgres
		// answers.
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || !strings.HasPrefix(pgErr.Code, "57") {
			return err
		}
		if err := p.Ping(ctx); err != nil {
			return err
		}
	}
	tick := time.NewTicker(warmPoll)
	defer tick.Stop()
	for {
		st := p.Stat()
		open := st.TotalConns() - st.ConstructingConns()
		if open >= size {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d connections open: %w", open, size, ctx.Err())
		case <-tick.C:
		}
	}
}
