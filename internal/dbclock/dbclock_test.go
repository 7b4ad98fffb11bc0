package dbclock_test

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/claudemesh/broker/internal/dbclock"
	"github.com/claudemesh/broker/internal/metrics"
)

// fakeDB answers with a clock ahead of ours, or fails.
type fakeDB struct {
	ahead time.Duration
	down  atomic.Bool
	calls atomic.Int64
}

func (f *fakeDB) Now(context.Context) (time.Time, error) {
	f.calls.Add(1)
	if f.down.Load() {
		return time.Time{}, errors.New("down")
	}
	return time.Now().Add(f.ahead), nil
}

// The clock corrects for its offset from Postgres from Start on, reports
// an outage, and calls OnHealthy when Postgres answers again.
func TestClock(t *testing.T) {
	db := &fakeDB{ahead: 2 * time.Minute}
	c := dbclock.New(db, nil, metrics.New(prometheus.NewRegistry()), slog.New(slog.DiscardHandler))
	recovered := make(chan struct{}, 1)
	c.OnHealthy = func() { recovered <- struct{}{} }
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer c.Stop(context.Background())
	if off := time.Until(c.Now()); math.Abs(off.Seconds()-120) > 5 {
		t.Fatalf("offset right after Start: %s, want about 2m", off)
	}
	if !c.Healthy() {
		t.Fatal("unhealthy before any failure")
	}
	db.down.Store(true)
	deadline := time.Now().Add(10 * time.Second)
	for c.Healthy() {
		if time.Now().After(deadline) {
			t.Fatal("an outage was not noticed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	db.down.Store(false)
	select {
	case <-recovered:
	case <-time.After(10 * time.Second):
		t.Fatal("OnHealthy not called after the outage")
	}
	if !c.Healthy() {
		t.Fatal("unhealthy after recovery")
	}
}
