// Package replay records accepted hello and hook signatures cluster-wide,
// so that none is accepted twice on any node, and takes the pending hook
// statuses of fresh hellos. A flood of connects costs one statement (and
// one commit) per batch, not per hello. The WebSocket front (hellos) and
// the HTTP routes (signed hooks) share one batcher.
package replay

import (
	"context"
	"time"

	"github.com/claudemesh/broker/internal/startstop"
	"github.com/claudemesh/broker/internal/store"
)

// Batcher records signatures in batches.
type Batcher struct {
	startstop.Base
	store   Store
	in      chan *helloReq
	workers int
}

// Store writes the batches (store.Store).
type Store interface {
	AcceptHellos(ctx context.Context, keep, pendingTTL time.Duration, checks []store.HelloCheck) ([]store.HelloResult, error)
	MemberHello(ctx context.Context, keep, pendingTTL time.Duration, all bool, memberID string, c store.HelloCheck) ([]store.Member, bool, store.HelloResult, error)
}

var _ startstop.Service = (*Batcher)(nil)

type helloReq struct {
	check store.HelloCheck
	done  chan helloAnswer
}

type helloAnswer struct {
	res store.HelloResult
	err error
}

// pendingHookTTL is how long a hook that arrived before its session is kept.
const pendingHookTTL = 10 * time.Second

// helloSeenFor keeps accepted signatures past the ±60 s window on either
// side, with margin for clock differences between nodes.
const helloSeenFor = 3 * time.Minute

// maxHelloBatch bounds one statement.
const maxHelloBatch = 1000

// New makes a batcher with workers concurrent batches; Start runs it.
func New(st Store, workers int) *Batcher {
	return &Batcher{store: st, in: make(chan *helloReq, 4096), workers: workers}
}

// Start runs the workers.
func (b *Batcher) Start(ctx context.Context) error {
	if _, ok := b.StartInit(ctx); !ok {
		return nil
	}
	for range b.workers {
		b.Go(b.run)
	}
	return nil
}

// Stop stops the workers; hellos waiting for a batch fail.
func (b *Batcher) Stop(ctx context.Context) { b.Base.Stop(ctx) }

// Accept records one signature; it waits for the batch it joins. Fresh
// is false when the signature was accepted before.
func (b *Batcher) Accept(ctx context.Context, c store.HelloCheck) (store.HelloResult, error) {
	req := &helloReq{check: c, done: make(chan helloAnswer, 1)}
	select {
	case b.in <- req:
	case <-ctx.Done():
		return store.HelloResult{}, ctx.Err()
	case <-b.Stopping():
		return store.HelloResult{}, context.Canceled
	}
	select {
	case a := <-req.done:
		return a.res, a.err
	case <-ctx.Done():
		return store.HelloResult{}, ctx.Err()
	case <-b.Stopped():
		return store.HelloResult{}, context.Canceled
	}
}

// AcceptMember records c, a hello of member memberID, in the statement
// that looks its members up (store.MemberHello: all of its mesh's live
// members, or only the one with c's key), when it is a live member's: a
// hello whose member is not cached costs one round trip, not a lookup and
// then a batch. recorded is false when nothing was recorded (no such
// member, or Postgres refused c's values); the hello is then not accepted
// unless Accept records it. It does not join a batch: a node pays it once
// per mesh it has not cached (concurrent hellos share the lookup and take
// the batch), and for members enrolled since.
func (b *Batcher) AcceptMember(ctx context.Context, all bool, memberID string, c store.HelloCheck) (members []store.Member, recorded bool, res store.HelloResult, err error) {
	select {
	case <-b.Stopping():
		return nil, false, store.HelloResult{}, context.Canceled
	default:
	}
	return b.store.MemberHello(ctx, helloSeenFor, pendingHookTTL, all, memberID, c)
}

func (b *Batcher) run(ctx context.Context) {
	batch := make([]*helloReq, 0, maxHelloBatch)
	for {
		select {
		case <-ctx.Done():
			return
		case first := <-b.in:
			batch = append(batch[:0], first)
		}
	gather:
		for len(batch) < maxHelloBatch {
			select {
			case r := <-b.in:
				batch = append(batch, r)
			default:
				break gather
			}
		}
		b.flush(batch)
	}
}

func (b *Batcher) flush(batch []*helloReq) {
	// The same signature twice in one batch: the later ones are replays.
	seen := make(map[string]bool, len(batch))
	checks := make([]store.HelloCheck, 0, len(batch))
	send := make([]*helloReq, 0, len(batch))
	for _, r := range batch {
		k := string(r.check.SigHash)
		if seen[k] {
			r.done <- helloAnswer{res: store.HelloResult{Fresh: false}}
			continue
		}
		seen[k] = true
		checks = append(checks, r.check)
		send = append(send, r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	res, err := b.store.AcceptHellos(ctx, helloSeenFor, pendingHookTTL, checks)
	cancel()
	for i, r := range send {
		if err != nil {
			r.done <- helloAnswer{err: err}
			continue
		}
		// A hello Postgres refused fails alone; the batch's others stand.
		r.done <- helloAnswer{res: res[i], err: res[i].Err}
	}
}
