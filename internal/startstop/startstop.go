// Package startstop gives every long-running worker of a node one
// lifecycle: Start(ctx) error launches its goroutines, Stop(ctx) stops them
// and waits, bounded by ctx. No goroutine starts in a constructor, and no
// goroutine starts once Stop has begun: a callback that arrives during a
// shutdown (a gossip event, a notification) finds the worker stopping and
// does nothing, instead of racing Stop's wait.
//
// Workers embed Base and call StartInit at the top of their Start and Go
// for each goroutine (river's internal/startstop has the same shape).
package startstop

import (
	"context"
	"sync"
)

// Service is a worker with the one lifecycle.
type Service interface {
	// Start launches the worker; ctx bounds the start-up only, not the
	// worker's life. Starting twice, or after Stop, does nothing.
	Start(ctx context.Context) error
	// Stop stops the worker and waits for its goroutines, at most until
	// ctx ends. It is idempotent and safe before Start.
	Stop(ctx context.Context)
}

// Base is the bookkeeping of a Service: the context its goroutines run
// under (cancelled by Stop) and the goroutines Stop waits for. The zero
// value is ready to use.
type Base struct {
	mu       sync.Mutex
	started  bool
	stopping bool
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopCh   chan struct{} // closed when Stop begins
	doneCh   chan struct{} // closed when every goroutine has returned after Stop
}

// lazy makes the channels; mu is held.
func (b *Base) lazy() {
	if b.stopCh == nil {
		b.stopCh = make(chan struct{})
		b.doneCh = make(chan struct{})
	}
}

// StartInit marks the service started and returns the context its
// goroutines run under: ctx's values, not its deadline, cancelled by Stop.
// ok is false when the service was started before or is stopping; Start
// should then return at once.
func (b *Base) StartInit(ctx context.Context) (run context.Context, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lazy()
	if b.started || b.stopping {
		return nil, false
	}
	b.started = true
	b.ctx, b.cancel = context.WithCancel(context.WithoutCancel(ctx))
	return b.ctx, true
}

// Go runs fn on a goroutine that Stop waits for, with the run context. It
// reports false, and does not run fn, before Start or once Stop has begun.
func (b *Base) Go(fn func(ctx context.Context)) bool {
	b.mu.Lock()
	if !b.started || b.stopping {
		b.mu.Unlock()
		return false
	}
	b.wg.Add(1)
	ctx := b.ctx
	b.mu.Unlock()
	go func() {
		defer b.wg.Done()
		fn(ctx)
	}()
	return true
}

// Context is the run context (cancelled by Stop), or a cancelled one
// before Start.
func (b *Base) Context() context.Context {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ctx == nil {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		return ctx
	}
	return b.ctx
}

// Stop cancels the run context and waits, at most until ctx ends, for the
// goroutines started by Go. It reports whether they all returned.
func (b *Base) Stop(ctx context.Context) bool {
	b.mu.Lock()
	b.lazy()
	if !b.stopping {
		b.stopping = true
		close(b.stopCh)
		if b.cancel != nil {
			b.cancel()
		}
		done := b.doneCh
		go func() {
			b.wg.Wait()
			close(done)
		}()
	}
	done := b.doneCh
	b.mu.Unlock()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// Stopping is closed once Stop has begun.
func (b *Base) Stopping() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lazy()
	return b.stopCh
}

// Stopped is closed once Stop has begun and every goroutine has returned.
func (b *Base) Stopped() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lazy()
	return b.doneCh
}

// StopAll stops services in order, each bounded by ctx.
func StopAll(ctx context.Context, services ...Service) {
	for _, s := range services {
		if s != nil {
			s.Stop(ctx)
		}
	}
}
