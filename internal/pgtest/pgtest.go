// Package pgtest gives tests a real PostgreSQL: one private server per test
// binary (started by Main from TestMain) and a fresh, migrated database per
// test (NewDB), cloned from a template so each costs a few milliseconds.
//
// Set TEST_DATABASE_URL to use an existing server instead (its user must be
// allowed to create databases).
package pgtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/claudemesh/broker/internal/pgembed"
	"github.com/claudemesh/broker/internal/store"
)

const template = "cm_template"

var (
	srv     *pgembed.Server
	baseURL string // URL of the "postgres" database when external
	counter atomic.Int64
)

// Main starts the server, migrates the template database, runs the tests,
// stops the server and checks for leaked goroutines. Use it as
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
func Main(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	stop, err := start(ctx)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		return 1
	}
	code := m.Run()
	stop()
	if code == 0 {
		if err := goleak.Find(LeakOptions()...); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: goroutine leak:", err)
			return 1
		}
	}
	return code
}

// LeakOptions are the goroutines the leak check tolerates: ones owned by
// libraries that stop them lazily.
func LeakOptions() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/memberlist.(*Memberlist).packetHandler"),
	}
}

func start(ctx context.Context) (func(), error) {
	if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
		baseURL = u
		return func() {}, setupTemplate(ctx)
	}
	dir, err := os.MkdirTemp("", "cmtest-pg-")
	if err != nil {
		return nil, err
	}
	// The server may run as the postgres user: it must reach the folder.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	srv, err = pgembed.Start(ctx, pgembed.Options{DataDir: filepath.Join(dir, "data"), Fast: true})
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	baseURL = srv.URL("postgres")
	if err := setupTemplate(ctx); err != nil {
		srv.Stop()
		os.RemoveAll(dir)
		return nil, err
	}
	return func() {
		srv.Stop()
		os.RemoveAll(dir)
	}, nil
}

func setupTemplate(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, baseURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	name := template
	if srv == nil {
		// A shared external server: make the template unique to this binary.
		name = fmt.Sprintf("%s_%d", template, os.Getpid())
	}
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return err
	}
	if _, err := store.Migrate(ctx, withDB(baseURL, name)); err != nil {
		return err
	}
	templateName = name
	return nil
}

var templateName string

func withDB(base, db string) string {
	u, err := url.Parse(base)
	if err != nil {
		return base
	}
	u.Path = "/" + db
	return u.String()
}

// Server is the private server (nil when TEST_DATABASE_URL is used).
func Server() *pgembed.Server { return srv }

// NewDB creates a migrated database for one test and returns its URL. The
// database is dropped when the test ends.
func NewDB(t testing.TB) string {
	t.Helper()
	if baseURL == "" {
		t.Fatal("pgtest: Main was not called from TestMain")
	}
	name := fmt.Sprintf("t_%d_%d_%s", os.Getpid(), counter.Add(1), sanitize(t.Name()))
	if len(name) > 60 {
		name = name[:60]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, baseURL)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()+" TEMPLATE "+pgx.Identifier{templateName}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, baseURL)
		if err != nil {
			return // the server may have been stopped by the test
		}
		defer conn.Close(ctx)
		_, _ = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	})
	return withDB(baseURL, name)
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
