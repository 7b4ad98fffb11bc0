package faultkit

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/pgembed"
	"github.com/claudemesh/broker/internal/store"
)

// PrivatePostgres starts a migrated Postgres of the test's own, which the
// test may stop and start (the shared test server must stay up). Its
// "postgres" database holds the schema. It is stopped when the test ends.
// settings are extra server settings ("name=value", pgembed.Options).
func PrivatePostgres(t testing.TB, settings ...string) *pgembed.Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "cmtest-private-pg-")
	if err != nil {
		t.Fatal(err)
	}
	// The server may run as the postgres user: it must reach the folder.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg, err := pgembed.Start(ctx, pgembed.Options{DataDir: filepath.Join(dir, "data"), Fast: true, Settings: settings})
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = pg.Stop()
		os.RemoveAll(dir)
	})
	if _, err := store.Migrate(ctx, pg.URL("postgres")); err != nil {
		t.Fatal(err)
	}
	return pg
}
