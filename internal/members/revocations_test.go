package members_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"

	"github.com/claudemesh/broker/internal/members"
)

// revocationsFake records what a Revocations asks and closes.
type revocationsFake struct {
	mu      sync.Mutex
	revoked map[string]bool
	fail    bool
	queries [][]string
	closed  []string
	refuted int
	spawned int
	wg      sync.WaitGroup
	// entered and release, when set, hold the first query.
	entered, release chan struct{}
}

func (f *revocationsFake) checker() *members.Revocations {
	return members.NewRevocations(members.RevocationsConfig{
		RevokedAmong: func(_ context.Context, ids []string) ([]string, error) {
			f.mu.Lock()
			f.queries = append(f.queries, slices.Sorted(slices.Values(ids)))
			first := len(f.queries) == 1
			f.mu.Unlock()
			if first && f.entered != nil {
				close(f.entered)
				<-f.release
			}
			if f.fail {
				return nil, errors.New("postgres away")
			}
			var out []string
			for _, id := range ids {
				if f.revoked[id] {
					out = append(out, id)
				}
			}
			return out, nil
		},
		Close: func(id, why string) {
			f.mu.Lock()
			f.closed = append(f.closed, id+" "+why)
			f.mu.Unlock()
		},
		Go: func(fn func(context.Context)) bool {
			f.mu.Lock()
			f.spawned++
			f.mu.Unlock()
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				fn(context.Background())
			}()
			return true
		},
		Refuted: func(n int) { f.refuted += n },
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
}

// Notices that come while a check runs wait for one more query, made by
// the same checker; only members the database confirms are closed, the
// rest are counted as refuted.
func TestRevocationsNotice(t *testing.T) {
	f := &revocationsFake{revoked: map[string]bool{"a": true, "c": true},
		entered: make(chan struct{}), release: make(chan struct{})}
	r := f.checker()
	r.Notice("a")
	<-f.entered
	r.Notice("b")
	r.Notice("c")
	r.Notice("b")
	close(f.release)
	f.wg.Wait()
	if f.spawned != 1 {
		t.Fatalf("%d checkers started, want 1", f.spawned)
	}
	if want := [][]string{{"a"}, {"b", "c"}}; !slices.EqualFunc(f.queries, want, slices.Equal[[]string]) {
		t.Fatalf("queries %v, want %v", f.queries, want)
	}
	if want := []string{"a revoked", "c revoked"}; !slices.Equal(f.closed, want) {
		t.Fatalf("closed %v, want %v", f.closed, want)
	}
	if f.refuted != 1 {
		t.Fatalf("%d refuted, want 1 (b)", f.refuted)
	}
	// Once it ended, a new notice starts a new checker.
	r.Notice("c")
	f.wg.Wait()
	if f.spawned != 2 || len(f.closed) != 3 {
		t.Fatalf("after the checker ended: %d started, closed %v", f.spawned, f.closed)
	}
}

// A checker refused (its owner is stopping) does not stay marked as
// running: the next notice tries again.
func TestRevocationsRefusedChecker(t *testing.T) {
	var runs []func(context.Context)
	refuse := true
	r := members.NewRevocations(members.RevocationsConfig{
		RevokedAmong: func(context.Context, []string) ([]string, error) { return []string{"a"}, nil },
		Close:        func(string, string) {},
		Go: func(fn func(context.Context)) bool {
			if refuse {
				return false
			}
			runs = append(runs, fn)
			return true
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	r.Notice("a")
	refuse = false
	r.Notice("a")
	if len(runs) != 1 {
		t.Fatalf("%d checkers started after a refused one, want 1", len(runs))
	}
}

// Check closes the revoked members among those given, as the periodic
// check; when the database fails nobody is closed.
func TestRevocationsCheck(t *testing.T) {
	f := &revocationsFake{revoked: map[string]bool{"b": true}}
	r := f.checker()
	r.Check(context.Background(), nil)
	r.Check(context.Background(), []string{"a", "b"})
	if len(f.queries) != 1 || !slices.Equal(f.closed, []string{"b revocation check"}) {
		t.Fatalf("queries %v, closed %v", f.queries, f.closed)
	}
	f.fail = true
	r.Check(context.Background(), []string{"b"})
	r.Notice("b")
	f.wg.Wait()
	if len(f.closed) != 1 || f.refuted != 0 {
		t.Fatalf("closed %v, %d refuted while the database failed", f.closed, f.refuted)
	}
}
