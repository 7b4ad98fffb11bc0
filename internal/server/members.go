package server

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

// memberCache keeps each active mesh's live members in memory. Membership
// changes are announced on the member channel and drop the mesh's entry.
// A mesh without members is not cached: anyone can sign a hello for a mesh
// id they make up, and each would otherwise leave an entry behind.
type memberCache struct {
	store   *store.Store
	sf      singleflight.Group
	evicted func() // counts lists dropped because the cache was full
	max     int

	mu     sync.RWMutex
	meshes map[string]*meshMembers

	// revoking holds members named by revocation notices, waiting for the
	// database to confirm (revocations.go). Guarded by revMu; at most one
	// checker runs (revRunning).
	revMu      sync.Mutex
	revoking   map[string]struct{}
	revRunning bool
}

type meshMembers struct {
	loaded   time.Time
	all      []store.Member
	byPubkey map[string]store.Member
}

func newMemberCache(st *store.Store, evicted func()) *memberCache {
	return &memberCache{store: st, evicted: evicted, max: maxCachedMeshes, meshes: map[string]*meshMembers{}}
}

func (c *memberCache) get(ctx context.Context, mesh string, maxAge time.Duration) (*meshMembers, error) {
	c.mu.RLock()
	mm := c.meshes[mesh]
	c.mu.RUnlock()
	if mm != nil && time.Since(mm.loaded) < maxAge {
		return mm, nil
	}
	v, err, _ := c.sf.Do(mesh, func() (any, error) {
		all, err := c.store.MeshMembers(ctx, mesh)
		if err != nil {
			return nil, err
		}
		mm := &meshMembers{loaded: time.Now(), all: all, byPubkey: make(map[string]store.Member, len(all))}
		for _, m := range all {
			mm.byPubkey[m.Pubkey] = m
		}
		if len(all) > 0 {
			c.store1(mesh, mm)
		}
		return mm, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*meshMembers), nil
}

// byPubkey finds a live member. A miss is checked against Postgres with
// one indexed lookup, so a member enrolled a moment ago is found even before
// its change notification arrives (the mesh's list is then reloaded).
func (c *memberCache) byPubkey(ctx context.Context, mesh, pubkey string) (store.Member, error) {
	mm, err := c.get(ctx, mesh, memberCacheTTL)
	if err != nil {
		return store.Member{}, err
	}
	if m, ok := mm.byPubkey[pubkey]; ok {
		return m, nil
	}
	m, err := c.store.MemberByPubkey(ctx, mesh, pubkey)
	if err != nil {
		return store.Member{}, err
	}
	c.invalidate(mesh)
	return m, nil
}

// all returns the mesh's live members.
func (c *memberCache) all(ctx context.Context, mesh string) ([]store.Member, error) {
	mm, err := c.get(ctx, mesh, memberCacheTTL)
	if err != nil {
		return nil, err
	}
	return mm.all, nil
}

// store1 caches one mesh's list, dropping the oldest when full.
func (c *memberCache) store1(mesh string, mm *meshMembers) {
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

// len is how many meshes are cached.
func (c *memberCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.meshes)
}

// invalidate drops a mesh's list.
func (c *memberCache) invalidate(mesh string) {
	c.mu.Lock()
	delete(c.meshes, mesh)
	c.mu.Unlock()
}

// invalidateAll drops every list: membership changes announced while the
// listener was away were missed.
func (c *memberCache) invalidateAll() {
	c.mu.Lock()
	clear(c.meshes)
	c.mu.Unlock()
}

// gc drops lists nobody used for a while.
func (c *memberCache) gc() {
	c.mu.Lock()
	for id, mm := range c.meshes {
		if time.Since(mm.loaded) > 10*memberCacheTTL {
			delete(c.meshes, id)
		}
	}
	c.mu.Unlock()
}
