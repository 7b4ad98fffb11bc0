package members

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Revocations confirms revocation notices before anything acts on them.
// Any database role can NOTIFY on the member channel, and a close 1008
// unauthorized is final for clients: a forged notice must close nobody.
// Noticed members wait in a set that one checker drains, one query per
// round, however many notices came. Check is the periodic safety net for
// notices never received.
type Revocations struct {
	cfg RevocationsConfig

	mu      sync.Mutex
	pending map[string]struct{}
	running bool // a checker runs
}

// RevocationsConfig are a Revocations' collaborators; all are required but
// Refuted.
type RevocationsConfig struct {
	// RevokedAmong returns the ids among ids whose member is revoked
	// (store.Store.RevokedAmong).
	RevokedAmong func(ctx context.Context, ids []string) ([]string, error)
	// Close closes the sessions of a member the database confirmed
	// revoked; why says which check found it.
	Close func(memberID, why string)
	// Go runs the checker on a goroutine that ends with its owner (the
	// server's loops); false when refused (the owner is stopping).
	Go func(fn func(ctx context.Context)) bool
	// Refuted counts notices the database did not confirm.
	Refuted func(n int)
	Logger  *slog.Logger
}

// NewRevocations makes a checker; nothing runs until a notice comes.
func NewRevocations(cfg RevocationsConfig) *Revocations {
	if cfg.Refuted == nil {
		cfg.Refuted = func(int) {}
	}
	return &Revocations{cfg: cfg}
}

// Notice queues a member named by a revocation notice for confirmation,
// starting the checker unless one runs. The caller filters out members
// with nothing to close (a flood of notices for invented ids then costs no
// query).
func (r *Revocations) Notice(member string) {
	r.mu.Lock()
	if r.pending == nil {
		r.pending = map[string]struct{}{}
	}
	r.pending[member] = struct{}{}
	start := !r.running
	r.running = true
	r.mu.Unlock()
	if start && !r.cfg.Go(r.loop) {
		r.mu.Lock()
		r.running = false
		r.mu.Unlock()
	}
}

// loop checks pending notices against the database until none is left.
func (r *Revocations) loop(ctx context.Context) {
	for {
		r.mu.Lock()
		pending := r.pending
		r.pending = nil
		if len(pending) == 0 || ctx.Err() != nil {
			r.running = false
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		ids := make([]string, 0, len(pending))
		for id := range pending {
			ids = append(ids, id)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		revoked, err := r.cfg.RevokedAmong(cctx, ids)
		cancel()
		if err != nil {
			// The periodic check closes them once Postgres answers.
			r.cfg.Logger.Warn("checking revocation notices failed; the periodic check will retry", "err", err, "members", len(ids))
			continue
		}
		for _, id := range revoked {
			delete(pending, id)
			r.cfg.Close(id, "revoked")
		}
		if len(pending) > 0 {
			r.cfg.Refuted(len(pending))
			r.cfg.Logger.Warn("revocation notice for members that are not revoked; ignored", "members", len(pending))
		}
	}
}

// Check closes the members among ids that are revoked, in case their
// notice was missed. An error leaves them to the next check.
func (r *Revocations) Check(ctx context.Context, ids []string) {
	if len(ids) == 0 {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	revoked, err := r.cfg.RevokedAmong(cctx, ids)
	if err != nil {
		return
	}
	for _, id := range revoked {
		r.cfg.Close(id, "revocation check")
	}
}
