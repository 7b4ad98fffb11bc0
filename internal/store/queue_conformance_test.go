package store_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery/deliverytest"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/store"
)

// The Postgres queue passes the same conformance suite as the in-memory one
// the engine's unit tests run on.
func TestQueueConformance(t *testing.T) {
	deliverytest.RunQueueSuite(t, func(t *testing.T) *deliverytest.Harness {
		url := pgtest.NewDB(t)
		s, err := store.Open(context.Background(), url, 8)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		key, err := relay.NewEnvelopeKey(relay.DeriveEnvelopeKey("conformance"))
		if err != nil {
			t.Fatal(err)
		}
		s.SetEnvelopeKey(key.Pads())
		return &deliverytest.Harness{
			Queue: s, Key: key,
			Members: func(t *testing.T, n int) (string, []string) {
				f := seed(t, s, n)
				ids := make([]string, n)
				for i, m := range f.members {
					ids[i] = m.ID
				}
				return f.mesh.ID, ids
			},
			Listen: func(t *testing.T, channel string) <-chan string { return listen(t, url, channel) },
		}
	})
}

// listen LISTENs on channel on a connection of its own until the test ends.
func listen(t *testing.T, url, channel string) <-chan string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		cancel()
		t.Fatal(err)
	}
	out := make(chan string, 64)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			n, err := conn.WaitForNotification(ctx)
			if err != nil {
				return
			}
			out <- n.Payload
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		_ = conn.Close(context.Background())
	})
	return out
}
