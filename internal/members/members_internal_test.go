package members

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
)

// Anyone can sign a hello with a key of their own for a mesh id they make
// up: the lookups it causes must not leave entries behind, and real meshes
// stay bounded too, the oldest list going first (counted).
func TestMemberCacheBounded(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, pgtest.NewDB(t), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	evicted := 0
	c := New(st, func() { evicted++ })
	c.max = 2

	var meshes []string
	for i := 0; i < 3; i++ {
		mc, err := admin.CreateMesh(ctx, st, fmt.Sprintf("m%d", i), "")
		if err != nil {
			t.Fatal(err)
		}
		pub, _, _ := ed25519.GenerateKey(nil)
		if _, err := admin.AddMember(ctx, st, mc.MeshID, hex.EncodeToString(pub), "alice", "member"); err != nil {
			t.Fatal(err)
		}
		meshes = append(meshes, mc.MeshID)
	}
	stranger := hex.EncodeToString(make([]byte, 32))
	for i := 0; i < 500; i++ {
		if _, err := c.ByPubkey(ctx, fmt.Sprintf("made-up-%d", i), stranger); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("lookup in a made-up mesh: %v", err)
		}
	}
	if n := c.Len(); n != 0 {
		t.Fatalf("%d made-up meshes cached", n)
	}
	for _, m := range meshes {
		all, err := c.All(ctx, m)
		if err != nil || len(all) != 1 {
			t.Fatalf("mesh %s: %v members, %v", m, len(all), err)
		}
	}
	if n := c.Len(); n != 2 || evicted != 1 {
		t.Fatalf("%d meshes cached, %d evicted; want 2 and 1", n, evicted)
	}
	if _, ok := c.meshes[meshes[0]]; ok {
		t.Fatal("the oldest list was kept and a newer one dropped")
	}
}

// Lookup asks its load for what it needs from Postgres, at most once: the
// mesh's list when it is not cached (concurrent lookups share one load, and
// only its runner is told it ran), nothing when the list has the member,
// the member alone when the list misses it (the list is then dropped). A
// mesh without members is not cached, and a miss in a list the lookup's
// own load just read is final.
func TestLookupLoads(t *testing.T) {
	ctx := context.Background()
	c := New(nil, nil)
	alice := store.Member{ID: "a", MeshID: "m", Pubkey: "pa"}
	bob := store.Member{ID: "b", MeshID: "m", Pubkey: "pb"}
	type call struct{ all bool }
	var mu sync.Mutex
	var calls []call
	members := []store.Member{alice}
	release := make(chan struct{})
	load := func(_ context.Context, all bool) ([]store.Member, error) {
		mu.Lock()
		calls = append(calls, call{all})
		first := len(calls) == 1
		mu.Unlock()
		if first {
			<-release
		}
		if all {
			return members, nil
		}
		return []store.Member{bob}, nil
	}

	// Concurrent lookups of an uncached mesh: one load, for all.
	const n = 8
	var wg sync.WaitGroup
	ran := make([]bool, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			var m store.Member
			m, ran[i], errs[i] = c.Lookup(ctx, "m", "pa", load)
			if errs[i] == nil && m.ID != alice.ID {
				errs[i] = fmt.Errorf("got %+v", m)
			}
		})
	}
	// Let the lookups pile up on the first load before it answers.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		started := len(calls)
		mu.Unlock()
		if started == 1 || time.Now().After(deadline) {
			break
		}
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	runners := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("lookup %d: %v", i, errs[i])
		}
		if ran[i] {
			runners++
		}
	}
	mu.Lock()
	loads := len(calls)
	mu.Unlock()
	if runners < 1 || runners != loads || !calls[0].all {
		t.Fatalf("%d lookups ran a load, %d loads (%+v): want each load run by one lookup, the first of all members", runners, loads, calls)
	}

	calls = nil
	if m, ran, err := c.Lookup(ctx, "m", "pa", load); err != nil || ran || m.ID != alice.ID || len(calls) != 0 {
		t.Fatalf("a cached member: %+v, ran %v, %v, %d loads", m, ran, err, len(calls))
	}
	if m, ran, err := c.Lookup(ctx, "m", "pb", load); err != nil || !ran || m.ID != bob.ID || len(calls) != 1 || calls[0].all {
		t.Fatalf("a member the list misses: %+v, ran %v, %v, loads %+v; want it loaded alone", m, ran, err, calls)
	}
	if c.Len() != 0 {
		t.Fatal("the list that missed a member was kept")
	}

	calls, members = nil, nil
	for range 3 {
		if _, ran, err := c.Lookup(ctx, "empty", "pa", load); !errors.Is(err, store.ErrNotFound) || !ran {
			t.Fatalf("a mesh without members: ran %v, %v", ran, err)
		}
	}
	if c.Len() != 0 || len(calls) != 3 {
		t.Fatalf("a mesh without members: %d meshes cached, %d loads (%+v); want none cached, one load (of all) each", c.Len(), len(calls), calls)
	}
	for _, cl := range calls {
		if !cl.all {
			t.Fatalf("a mesh without members was asked for one member after its list: %+v", calls)
		}
	}
}

// blockingStore answers MeshMembers only once the test releases it, as a
// Postgres that went away does.
type blockingStore struct {
	members []store.Member
	calls   chan struct{}
	release chan struct{}
}

func (b *blockingStore) MeshMembers(ctx context.Context, _ string) ([]store.Member, error) {
	b.calls <- struct{}{}
	select {
	case <-b.release:
		return b.members, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (b *blockingStore) MemberByPubkey(context.Context, string, string) (store.Member, error) {
	return store.Member{}, store.ErrNotFound
}

// A send's recipients come from a list past its TTL at once while the list
// is reloaded behind it (one reload however many sends), and from the
// reloaded list after; a list past TTL + maxStale, or one dropped by a
// notification, is not used.
func TestRecipientsFromExpiredListWhileReloaded(t *testing.T) {
	ctx := context.Background()
	alice := store.Member{ID: "a", MeshID: "m", Pubkey: "pa"}
	bob := store.Member{ID: "b", MeshID: "m", Pubkey: "pb"}
	st := &blockingStore{members: []store.Member{alice, bob}, calls: make(chan struct{}, 16), release: make(chan struct{})}
	c := New(st, nil)
	var bg sync.WaitGroup
	c.Background = func(fn func(context.Context)) bool {
		bg.Go(func() { fn(ctx) })
		return true
	}
	c.fill("m", []store.Member{alice})
	c.meshes["m"].loaded = time.Now().Add(-memberCacheTTL - time.Second)

	for range 3 {
		if m, err := c.RecipientByPubkey(ctx, "m", "pa"); err != nil || m.ID != "a" {
			t.Fatalf("a recipient in an expired list: %+v, %v", m, err)
		}
		if all, err := c.Recipients(ctx, "m"); err != nil || len(all) != 1 {
			t.Fatalf("the expired list: %v, %v", all, err)
		}
	}
	select {
	case <-st.calls:
	case <-time.After(10 * time.Second):
		t.Fatal("the expired list was not reloaded")
	}
	close(st.release)
	bg.Wait()
	if len(st.calls) != 0 {
		t.Fatalf("%d more reloads, want one for all the sends", len(st.calls))
	}
	if all, err := c.Recipients(ctx, "m"); err != nil || len(all) != 2 {
		t.Fatalf("after the reload: %v, %v", all, err)
	}

	// Too old to use, or dropped: the send waits for the load.
	for name, spoil := range map[string]func(){
		"past maxStale": func() { c.meshes["m"].loaded = time.Now().Add(-memberCacheTTL - maxStale) },
		"invalidated":   func() { c.Invalidate("m") },
	} {
		c.fill("m", []store.Member{alice})
		spoil()
		shortCtx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		st.release = make(chan struct{})
		_, err := c.Recipients(shortCtx, "m")
		cancel()
		<-st.calls
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: %v, want the send to wait for the load", name, err)
		}
	}
}

// After the listener reconnects, lists expire: a hello's lookup loads the
// list again before it authenticates with it, and a send still resolves
// its recipients from it (no round trip) while it is reloaded behind it.
func TestExpireAllAfterReconnect(t *testing.T) {
	ctx := context.Background()
	alice := store.Member{ID: "a", MeshID: "m", Pubkey: "pa"}
	bob := store.Member{ID: "b", MeshID: "m", Pubkey: "pb"}
	st := &blockingStore{members: []store.Member{alice, bob}, calls: make(chan struct{}, 16), release: make(chan struct{})}
	c := New(st, nil)
	var bg sync.WaitGroup
	c.Background = func(fn func(context.Context)) bool {
		bg.Go(func() { fn(ctx) })
		return true
	}
	c.fill("m", []store.Member{alice})
	c.ExpireAll()
	shortCtx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	_, err := c.All(shortCtx, "m")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || len(st.calls) != 1 {
		t.Fatalf("a hello's lookup after the reconnect: %v after %d loads, want it to wait for a load", err, len(st.calls))
	}
	<-st.calls
	if all, err := c.Recipients(ctx, "m"); err != nil || len(all) != 1 {
		t.Fatalf("a send after the reconnect: %v, %v; want the expired list at once", all, err)
	}
	select {
	case <-st.calls:
	case <-time.After(10 * time.Second):
		t.Fatal("the expired list was not reloaded behind the send")
	}
	close(st.release)
	bg.Wait()
	if all, err := c.All(ctx, "m"); err != nil || len(all) != 2 {
		t.Fatalf("after the reload: %v, %v", all, err)
	}
}

// silentStore answers no lookup before its caller's context ends.
type silentStore struct{}

func (silentStore) MeshMembers(ctx context.Context, _ string) ([]store.Member, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (silentStore) MemberByPubkey(ctx context.Context, _, _ string) (store.Member, error) {
	<-ctx.Done()
	return store.Member{}, ctx.Err()
}

// A send passes its session's context, which has no deadline: a lookup
// that reaches a Postgres that does not answer is still bounded, and the
// send refused as unavailable. A caller's own deadline is kept.
func TestLookupBoundedWithoutADeadline(t *testing.T) {
	c := New(silentStore{}, nil)
	c.lookupTimeout = 50 * time.Millisecond
	pubkey := hex.EncodeToString(make([]byte, 32))
	for _, spec := range []string{pubkey, "*"} {
		done := make(chan string, 1)
		go func() {
			_, code := c.Targets(context.Background(), "m", "sender", spec, nil)
			done <- code
		}()
		select {
		case code := <-done:
			if code != "unavailable" {
				t.Fatalf("target %q: code %q, want unavailable", spec, code)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("target %q: lookup not bounded", spec)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	got, _ := c.bound(ctx)
	if got != ctx {
		t.Fatal("a caller's deadline was replaced")
	}
}
