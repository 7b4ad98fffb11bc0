package startstop_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/startstop"
)

// Go runs goroutines only between Start and Stop, and Stop waits for them.
func TestLifecycle(t *testing.T) {
	var b startstop.Base
	if b.Go(func(context.Context) { t.Error("ran before Start") }) {
		t.Fatal("Go before Start reported true")
	}
	ctx, ok := b.StartInit(context.Background())
	if !ok {
		t.Fatal("first StartInit refused")
	}
	if _, again := b.StartInit(context.Background()); again {
		t.Fatal("second StartInit accepted")
	}
	exited := make(chan struct{})
	if !b.Go(func(ctx context.Context) { <-ctx.Done(); close(exited) }) {
		t.Fatal("Go after Start refused")
	}
	if ctx.Err() != nil {
		t.Fatal("run context cancelled before Stop")
	}
	stop, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if !b.Stop(stop) {
		t.Fatal("Stop timed out")
	}
	select {
	case <-exited:
	default:
		t.Fatal("Stop returned before the goroutine exited")
	}
	if b.Go(func(context.Context) { t.Error("ran after Stop") }) {
		t.Fatal("Go after Stop reported true")
	}
	if !b.Stop(stop) {
		t.Fatal("second Stop did not report done")
	}
	<-b.Stopped()
}

// The start-up context's deadline does not end the run context.
func TestRunOutlivesStartContext(t *testing.T) {
	var b startstop.Base
	start, cancel := context.WithCancel(context.Background())
	run, _ := b.StartInit(start)
	cancel()
	if run.Err() != nil {
		t.Fatal("run context ended with the start-up context")
	}
	b.Stop(context.Background())
	if run.Err() == nil {
		t.Fatal("run context not cancelled by Stop")
	}
}

// Stop is bounded by its context when a goroutine does not return, and
// Stopped still closes once it does.
func TestStopBounded(t *testing.T) {
	var b startstop.Base
	b.StartInit(context.Background())
	release := make(chan struct{})
	b.Go(func(context.Context) { <-release })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if b.Stop(ctx) {
		t.Fatal("Stop reported done while a goroutine runs")
	}
	close(release)
	select {
	case <-b.Stopped():
	case <-time.After(5 * time.Second):
		t.Fatal("Stopped never closed")
	}
}

// Callbacks racing Stop either run (and are waited for) or are refused:
// none starts after Stop's wait began (the race detector checks the rest).
func TestGoRacingStop(t *testing.T) {
	for range 50 {
		var b startstop.Base
		b.StartInit(context.Background())
		var wg sync.WaitGroup
		var mu sync.Mutex
		running := 0
		stopped := false
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b.Go(func(context.Context) {
					mu.Lock()
					if stopped {
						t.Error("a goroutine ran after Stop returned")
					}
					running++
					mu.Unlock()
				})
			}()
		}
		b.Stop(context.Background())
		mu.Lock()
		stopped = true
		mu.Unlock()
		wg.Wait()
	}
}

// Stop before Start is a no-op that reports done.
func TestStopBeforeStart(t *testing.T) {
	var b startstop.Base
	if !b.Stop(context.Background()) {
		t.Fatal("Stop before Start did not report done")
	}
	if _, ok := b.StartInit(context.Background()); ok {
		t.Fatal("StartInit after Stop accepted")
	}
	if b.Context().Err() == nil {
		t.Fatal("Context before Start is not cancelled")
	}
}
