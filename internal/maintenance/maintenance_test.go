package maintenance_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/maintenance"
)

type purge struct {
	audit     bool
	retention time.Duration
	limit     int
}

type fakeStore struct {
	depthErr    error
	depthCalled chan struct{} // optional
	purges      chan purge
}

func (f *fakeStore) QueueDepth(context.Context) (int64, error) {
	if f.depthCalled != nil {
		f.depthCalled <- struct{}{}
	}
	return 42, f.depthErr
}

func (f *fakeStore) Purge(_ context.Context, retention time.Duration, limit int) (int64, error) {
	f.purges <- purge{retention: retention, limit: limit}
	return 0, errors.New("purge refused")
}

func (f *fakeStore) PurgeAudit(_ context.Context, retention time.Duration, limit int) (int64, error) {
	f.purges <- purge{audit: true, retention: retention, limit: limit}
	return 0, nil
}

// The worker sets the depth gauge, purges both tables with their
// retention (a failed purge does not stop the other, nor the GC), runs
// the GC functions after the purges, and stops with Stop.
func TestWorker(t *testing.T) {
	st := &fakeStore{purges: make(chan purge)}
	depths := make(chan int64)
	gcs := make(chan string)
	w := maintenance.New(maintenance.Config{DeliveredRetention: time.Hour, AuditRetention: 720 * time.Hour,
		DepthInterval: time.Millisecond, PurgeInterval: time.Millisecond},
		maintenance.Deps{Store: st, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
			Depth: func(n int64) { depths <- n },
			GC:    []func(){func() { gcs <- "limiters" }, func() { gcs <- "members" }}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sawDepth := false
	for round := 0; round < 2; round++ {
		// Depth ticks may come between the steps of a purge round; each
		// step of the round still comes in order.
		want := []any{purge{retention: time.Hour, limit: 10000}, purge{audit: true, retention: 720 * time.Hour, limit: 10000}, "limiters", "members"}
		for i := 0; i < len(want); {
			select {
			case n := <-depths:
				if n != 42 {
					t.Fatalf("depth %d, want 42", n)
				}
				sawDepth = true
			case p := <-st.purges:
				if i > 1 || p != want[i] {
					t.Fatalf("round %d step %d: purge %+v, want %v", round, i, p, want[i])
				}
				i++
			case g := <-gcs:
				if i < 2 || g != want[i] {
					t.Fatalf("round %d step %d: gc %s, want %v", round, i, g, want[i])
				}
				i++
			case <-ctx.Done():
				t.Fatalf("round %d stuck at step %d", round, i)
			}
		}
	}
	for !sawDepth {
		select {
		case <-depths:
			sawDepth = true
		case <-st.purges:
		case <-gcs:
		case <-ctx.Done():
			t.Fatal("the depth gauge was never set")
		}
	}
	stopped := make(chan struct{})
	go func() {
		w.Stop(ctx)
		close(stopped)
	}()
	// The loop may be blocked handing over a value: drain until Stop
	// returns.
	for done := false; !done; {
		select {
		case <-stopped:
			done = true
		case <-depths:
		case <-st.purges:
		case <-gcs:
		case <-ctx.Done():
			t.Fatal("Stop did not return")
		}
	}
	select {
	case <-w.Stopped():
	default:
		t.Fatal("Stop returned before the loop ended")
	}
	if err := w.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-depths:
		t.Fatal("a stopped worker started again")
	case <-st.purges:
		t.Fatal("a stopped worker started again")
	default:
	}
}

// A failed count leaves the gauge alone.
func TestWorkerDepthError(t *testing.T) {
	st := &fakeStore{depthErr: errors.New("away"), depthCalled: make(chan struct{}), purges: make(chan purge, 2)}
	set := false
	w := maintenance.New(maintenance.Config{DepthInterval: time.Millisecond, PurgeInterval: time.Hour},
		maintenance.Deps{Store: st, Depth: func(int64) { set = true }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	_ = w.Start(context.Background())
	// The loop is sequential: once the second count is asked for, the
	// first one's answer has been handled.
	<-st.depthCalled
	<-st.depthCalled
	go w.Stop(context.Background())
	for done := false; !done; {
		select {
		case <-st.depthCalled: // a tick before the stop
		case <-w.Stopped():
			done = true
		}
	}
	if set {
		t.Fatal("a failed count set the depth gauge")
	}
}
