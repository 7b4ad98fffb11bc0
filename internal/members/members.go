// Package members caches each active mesh's live members for the node's
// front (hellos, sends, list_members) and its HTTP routes (hooks, joins).
package members

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/claudemesh/broker/internal/store"
)

// memberCacheTTL bounds how stale a mesh's member list may be when a
// change notification was lost.
const memberCacheTTL = 30 * time.Second

// maxCachedMeshes bounds the member cache. Only meshes with members are
// cached, so only real meshes count; past the bound the oldest list goes.
const maxCachedMeshes = 16384

// Cache keeps each active mesh's live members in memory. Membership
// changes are announced on the member channel and drop the mesh's entry.
// A mesh without members is not cached: anyone can sign a hello for a mesh
// id they make up, and each would otherwise leave an entry behind.
type Cache struct {
	store   Store
	sf      singleflight.Group
	evicted func() // counts lists dropped because the cache was full
	max     int
	// lookupTimeout is lookupTimeout, shortened by tests.
	lookupTimeout time.Duration
	// Background, when set, runs a reload of an expired list behind the
	// send that found it (the server's loops, which end with it; false when
	// refused). Nil: sends wait for the reload, as hellos do. Set before
	// use.
	Background func(fn func(ctx context.Context)) bool

	mu         sync.RWMutex
	meshes     map[string]*meshMembers
	refreshing map[string]bool // meshes whose list is reloaded behind a send
}

// Store is where member lists come from (store.Store).
type Store interface {
	MeshMembers(ctx context.Context, mesh string) ([]store.Member, error)
	MemberByPubkey(ctx context.Context, mesh, pubkey string) (store.Member, error)
}

type meshMembers struct {
	loaded   time.Time
	all      []store.Member
	byPubkey map[string]store.Member
}

// lookupTimeout bounds a statement the cache runs for a caller whose
// context has no deadline of its own (a send: the session's context).
// Such callers pass their context as it is, so that an answer from the
// cache, nearly every one, costs no timer.
const lookupTimeout = 5 * time.Second

// bound gives ctx the cache's lookup bound when it has none.
func (c *Cache) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.lookupTimeout)
}

// New makes a cache; evicted (optional) counts lists dropped because it
// was full.
func New(st Store, evicted func()) *Cache {
	return &Cache{store: st, evicted: evicted, max: maxCachedMeshes, lookupTimeout: lookupTimeout, meshes: map[string]*meshMembers{}, refreshing: map[string]bool{}}
}

func (c *Cache) get(ctx context.Context, mesh string, maxAge time.Duration) (*meshMembers, error) {
	c.mu.RLock()
	mm := c.meshes[mesh]
	c.mu.RUnlock()
	if mm != nil && time.Since(mm.loaded) < maxAge {
		return mm, nil
	}
	v, err, _ := c.sf.Do(mesh, func() (any, error) {
		ctx, cancel := c.bound(ctx)
		defer cancel()
		all, err := c.store.MeshMembers(ctx, mesh)
		if err != nil {
			return nil, err
		}
		return c.fill(mesh, all), nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*meshMembers), nil
}

// fill makes a mesh's list from its live members and caches it, unless
// it is empty.
func (c *Cache) fill(mesh string, all []store.Member) *meshMembers {
	mm := &meshMembers{loaded: time.Now(), all: all, byPubkey: make(map[string]store.Member, len(all))}
	for _, m := range all {
		mm.byPubkey[m.Pubkey] = m
	}
	if len(all) > 0 {
		c.store1(mesh, mm)
	}
	return mm
}

// Load reads live members of a mesh from Postgres in place of the cache's
// own statements, and may do more in the same statement (a hello records
// itself: Lookup). all asks for every live member of the mesh; otherwise
// the one with the key looked up is enough (none when there is none).
type Load func(ctx context.Context, all bool) ([]store.Member, error)

// Lookup finds a live member as ByPubkey does, but whatever it needs from
// Postgres it asks of load, at most once: the mesh's list when it is not
// cached (concurrent lookups of the mesh share one load, run by one of
// them), or the member alone when the cached list misses it. ran reports
// whether this lookup's load ran: false when the member came from memory
// or from another lookup's load.
func (c *Cache) Lookup(ctx context.Context, mesh, pubkey string, load Load) (m store.Member, ran bool, err error) {
	c.mu.RLock()
	mm := c.meshes[mesh]
	c.mu.RUnlock()
	if mm == nil || time.Since(mm.loaded) >= memberCacheTTL {
		v, err, _ := c.sf.Do(mesh, func() (any, error) {
			ran = true
			all, err := load(ctx, true)
			if err != nil {
				return nil, err
			}
			return c.fill(mesh, all), nil
		})
		if err != nil {
			return store.Member{}, ran, err
		}
		mm = v.(*meshMembers)
	}
	if m, ok := mm.byPubkey[pubkey]; ok {
		return m, ran, nil
	}
	if ran {
		// This lookup's own load listed the mesh just now.
		return store.Member{}, true, store.ErrNotFound
	}
	// As ByPubkey: a member enrolled a moment ago is found before its
	// change notification arrives, and the mesh's list is then reloaded.
	ms, err := load(ctx, false)
	if err != nil {
		return store.Member{}, true, err
	}
	for _, m := range ms {
		if m.Pubkey == pubkey {
			c.Invalidate(mesh)
			return m, true, nil
		}
	}
	return store.Member{}, true, store.ErrNotFound
}

// ByPubkey finds a live member. A miss is checked against Postgres with
// one indexed lookup, so a member enrolled a moment ago is found even before
// its change notification arrives (the mesh's list is then reloaded).
func (c *Cache) ByPubkey(ctx context.Context, mesh, pubkey string) (store.Member, error) {
	mm, err := c.get(ctx, mesh, memberCacheTTL)
	if err != nil {
		return store.Member{}, err
	}
	return c.byPubkeyIn(ctx, mm, mesh, pubkey)
}

// byPubkeyIn finds a live member in mm, or in Postgres when mm misses it.
func (c *Cache) byPubkeyIn(ctx context.Context, mm *meshMembers, mesh, pubkey string) (store.Member, error) {
	if m, ok := mm.byPubkey[pubkey]; ok {
		return m, nil
	}
	ctx, cancel := c.bound(ctx)
	defer cancel()
	m, err := c.store.MemberByPubkey(ctx, mesh, pubkey)
	if err != nil {
		return store.Member{}, err
	}
	c.Invalidate(mesh)
	return m, nil
}

// A send resolves its recipients from a list up to maxStale past its TTL
// while the list is reloaded behind it (Background): the reload costs the
// send no round trip, and a send made while Postgres is away waits for its
// commit, where it would otherwise wait for the reload and be refused
// unavailable when that timed out (the TTL of a mesh's list often runs out
// during an outage, and then every send of the mesh did). Only the TTL is
// stretched: a list dropped by a change notification (a revocation), or
// by the listener's reconnect, is not used; hellos and hooks, which
// authenticate with the list, never use an expired one.
const maxStale = memberCacheTTL

// refreshTimeout bounds a reload behind a send.
const refreshTimeout = 10 * time.Second

// getForSend is get for a send's recipients.
func (c *Cache) getForSend(ctx context.Context, mesh string) (*meshMembers, error) {
	c.mu.RLock()
	mm := c.meshes[mesh]
	c.mu.RUnlock()
	if mm != nil && c.Background != nil {
		if age := time.Since(mm.loaded); age >= memberCacheTTL && age < memberCacheTTL+maxStale {
			c.refresh(mesh)
			return mm, nil
		}
	}
	return c.get(ctx, mesh, memberCacheTTL)
}

// refresh reloads mesh's list in the background, once at a time.
func (c *Cache) refresh(mesh string) {
	c.mu.Lock()
	if c.refreshing[mesh] {
		c.mu.Unlock()
		return
	}
	c.refreshing[mesh] = true
	c.mu.Unlock()
	done := func() {
		c.mu.Lock()
		delete(c.refreshing, mesh)
		c.mu.Unlock()
	}
	ok := c.Background(func(ctx context.Context) {
		defer done()
		ctx, cancel := context.WithTimeout(ctx, refreshTimeout)
		defer cancel()
		_, _ = c.get(ctx, mesh, memberCacheTTL) // on failure, the next send tries again
	})
	if !ok {
		done()
	}
}

// RecipientByPubkey is ByPubkey for a send's recipient: it may use an
// expired list while it is reloaded (maxStale).
func (c *Cache) RecipientByPubkey(ctx context.Context, mesh, pubkey string) (store.Member, error) {
	mm, err := c.getForSend(ctx, mesh)
	if err != nil {
		return store.Member{}, err
	}
	return c.byPubkeyIn(ctx, mm, mesh, pubkey)
}

// Recipients is All for a send's recipients: it may use an expired list
// while it is reloaded (maxStale).
func (c *Cache) Recipients(ctx context.Context, mesh string) ([]store.Member, error) {
	mm, err := c.getForSend(ctx, mesh)
	if err != nil {
		return nil, err
	}
	return mm.all, nil
}

// All returns the mesh's live members.
func (c *Cache) All(ctx context.Context, mesh string) ([]store.Member, error) {
	mm, err := c.get(ctx, mesh, memberCacheTTL)
	if err != nil {
		return nil, err
	}
	return mm.all, nil
}

// store1 caches one mesh's list, dropping the oldest when full.
func (c *Cache) store1(mesh string, mm *meshMembers) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.meshes[mesh]; !ok && len(c.meshes) >= c.max {
		oldest := ""
		for id, x := range c.meshes {
			if oldest == "" || x.loaded.Before(c.meshes[oldest].loaded) {
				oldest = id
			}
		}
		delete(c.meshes, oldest)
		if c.evicted != nil {
			c.evicted()
		}
	}
	c.meshes[mesh] = mm
}

// Len is how many meshes are cached.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.meshes)
}

// Invalidate drops a mesh's list.
func (c *Cache) Invalidate(mesh string) {
	c.mu.Lock()
	delete(c.meshes, mesh)
	c.mu.Unlock()
}

// ExpireAll marks every list as past its TTL: membership changes
// announced while the listener was away were missed. Unlike dropping them, it does so without making the next send of every mesh wait for a
// reload: hellos and hooks load a list again before they authenticate with
// it, and a send may resolve its recipients from it for up to maxStale
// while it is reloaded behind the send, as from a list whose TTL ran out.
// (A send made just after Postgres came back used to pay a second round
// trip for the reload.) Entries are replaced, not changed: readers use
// them outside the lock.
func (c *Cache) ExpireAll() {
	c.mu.Lock()
	expired := time.Now().Add(-memberCacheTTL)
	for id, mm := range c.meshes {
		if mm.loaded.After(expired) {
			cp := *mm
			cp.loaded = expired
			c.meshes[id] = &cp
		}
	}
	c.mu.Unlock()
}

// GC drops lists nobody used for a while.
func (c *Cache) GC() {
	c.mu.Lock()
	for id, mm := range c.meshes {
		if time.Since(mm.loaded) > 10*memberCacheTTL {
			delete(c.meshes, id)
		}
	}
	c.mu.Unlock()
}
