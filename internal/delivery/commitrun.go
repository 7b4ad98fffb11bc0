package delivery

import (
	"context"
	"sync"
	"time"
)

// A shard commits one batch at a time, and the sends that arrive meanwhile
// form the next: under load the batches grow, not the statements. When
// Postgres goes away under a commit, though, that commit stays in flight
// until the path heals (a blackhole: the statement arrives, and is
// answered, a round trip after the heal) or its timeout; the shard's other
// senders would wait for it, and a send written as Postgres comes back
// would pay the stuck commit's round trip before its own. So a commit in
// flight for stuckAfter no longer holds up the senders it does not
// contain: up to maxShardCommits commits of a shard run at once, the later
// ones of sends whose senders have nothing in flight. A sender's later
// sends are held back, in order, until its commit ends: its sends still
// commit in order.
// stuckAfter is how long a commit runs before it is taken for stuck: a
// healthy Postgres answers in a round trip (under 300 ms from the farthest
// region), and a loaded one well within it. A variable for tests; each
// committer reads it once, when it is made.
var stuckAfter = 2 * time.Second

const (
	// maxShardCommits bounds a shard's commits in flight (and so the pool
	// connections a Postgres outage ties up).
	maxShardCommits = 3
	// maxHeld bounds the sends a shard holds back for their sender's
	// commit; past it the shard stops reading its channel, and senders
	// wait there (back-pressure, as before).
	maxHeld = maxBatchMessages
)

// shardRun is the state of one shard's loop.
type shardRun struct {
	c    *committer
	in   chan *Send
	done chan []*Send // commits that ended
	wg   sync.WaitGroup
	// held are sends whose sender has a commit in flight, in arrival order.
	held []*Send
	// busy counts, by sender member, the commits in flight with its sends.
	busy      map[string]int
	inFlight  int
	lastStart time.Time
}

func (c *committer) run(ctx context.Context, in chan *Send) {
	r := &shardRun{c: c, in: in, done: make(chan []*Send, maxShardCommits), busy: map[string]int{}}
	defer r.wg.Wait()
	for {
		if !r.canStart() {
			r.wait(ctx, nil)
			if ctx.Err() != nil {
				r.stop(ctx)
				return
			}
			continue
		}
		if batch := r.gather(); len(batch) > 0 {
			r.start(ctx, batch)
			continue
		}
		// Nothing to commit now: wait for a send, or for a commit to end.
		var inCh chan *Send
		if len(r.held) < maxHeld {
			inCh = in
		}
		r.wait(ctx, inCh)
		if ctx.Err() != nil {
			r.stop(ctx)
			return
		}
	}
}

// canStart reports whether another commit may start: none is in flight,
// or the one that started last is stuck and there is room for another.
func (r *shardRun) canStart() bool {
	return r.inFlight == 0 || (r.inFlight < maxShardCommits && time.Since(r.lastStart) >= r.c.stuckAfter)
}

// wait blocks until a commit ends, a send arrives on in (nil: none
// read), the newest commit in flight becomes stuck, or ctx ends.
func (r *shardRun) wait(ctx context.Context, in chan *Send) {
	var stuck <-chan time.Time
	if d := time.Until(r.lastStart.Add(r.c.stuckAfter)); r.inFlight > 0 && r.inFlight < maxShardCommits && d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		stuck = t.C
	}
	select {
	case b := <-r.done:
		r.ended(b)
	case s := <-in:
		r.held = append(r.held, s) // gather takes it, or holds it back
	case <-stuck:
	case <-ctx.Done():
	}
}

// gather takes the next batch: the held sends whose sender has nothing in
// flight (each sender's in order), then whatever the channel holds, as
// the batch bounds allow; sends of a sender with a commit in flight stay
// held.
func (r *shardRun) gather() []*Send {
	var batch []*Send
	recipients := 0
	full := func() bool { return len(batch) >= maxBatchMessages || recipients >= maxBatchRecipients }
	blocked := map[string]bool{} // senders with an earlier send still held
	kept := r.held[:0]
	for _, s := range r.held {
		id := s.Message.SenderMemberID
		if r.busy[id] > 0 || blocked[id] || full() {
			blocked[id] = true
			kept = append(kept, s)
			continue
		}
		batch = append(batch, s)
		recipients += len(s.Message.Recipients)
	}
	clear(r.held[len(kept):])
	r.held = kept
	for !full() && len(r.held) < maxHeld {
		select {
		case s := <-r.in:
			id := s.Message.SenderMemberID
			if r.busy[id] > 0 || blocked[id] {
				r.held = append(r.held, s)
				continue
			}
			batch = append(batch, s)
			recipients += len(s.Message.Recipients)
		default:
			return batch
		}
	}
	return batch
}

// start commits batch beside the shard's loop.
func (r *shardRun) start(ctx context.Context, batch []*Send) {
	for _, s := range batch {
		r.busy[s.Message.SenderMemberID]++
	}
	r.inFlight++
	r.lastStart = time.Now()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.c.commit(ctx, batch)
		r.done <- batch
	}()
}

// ended accounts for a commit that ended.
func (r *shardRun) ended(batch []*Send) {
	r.inFlight--
	for _, s := range batch {
		id := s.Message.SenderMemberID
		if r.busy[id]--; r.busy[id] <= 0 {
			delete(r.busy, id)
		}
	}
}

// stop ends the loop: the commits in flight finish, and what was accepted
// before the stop (held, and queued in the channel) is still committed,
// unless the engine abandons it (a crash).
func (r *shardRun) stop(ctx context.Context) {
	for r.inFlight > 0 {
		r.ended(<-r.done)
	}
	if r.c.abandon.Load() {
		return
	}
	for {
		batch := r.gather()
		if len(batch) == 0 {
			return
		}
		r.c.commit(ctx, batch)
	}
}
