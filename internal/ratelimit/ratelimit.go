// Package ratelimit holds the token buckets per key that bound what any
// client address or member may cost a node: hellos, hooks, joins, login
// attempts. One Keyed limiter may be shared by several routes, keys
// prefixed by route, so one budget covers them all.
package ratelimit

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// maxLimiterKeys bounds a keyed limiter (about 200 bytes a key). Keys are
// derived by the server (a client address or /64, an authenticated member),
// but an attacker with many addresses still makes one per address.
const maxLimiterKeys = 1 << 16

// Keyed is a token bucket per key (a client address, or a member
// and the session its hook is about), forgotten after a while without use.
type Keyed struct {
	rate    rate.Limit
	burst   int
	max     int
	evicted func() // counts a bucket dropped to make room

	mu   sync.Mutex
	keys map[string]*keyedEntry
}

type keyedEntry struct {
	lim  *rate.Limiter
	seen time.Time
}

// New makes a limiter of perSecond tokens a second per key, burst at most;
// evicted (optional) counts buckets dropped to make room.
func New(perSecond float64, burst int, evicted func()) *Keyed {
	if burst < 1 {
		burst = 1
	}
	return &Keyed{rate: rate.Limit(perSecond), burst: burst, max: maxLimiterKeys, evicted: evicted, keys: map[string]*keyedEntry{}}
}

// Allow takes a token for key.
func (k *Keyed) Allow(key string) bool {
	if k.rate <= 0 {
		return true
	}
	now := time.Now()
	k.mu.Lock()
	e := k.keys[key]
	if e == nil {
		if len(k.keys) >= k.max {
			// Full: drop an arbitrary bucket rather than refuse the new
			// key. A flood of fresh addresses then costs the limiter its
			// memory of some old ones (a fresh burst for them), never an
			// honest newcomer its first request.
			for old := range k.keys {
				delete(k.keys, old)
				break
			}
			if k.evicted != nil {
				k.evicted()
			}
		}
		e = &keyedEntry{lim: rate.NewLimiter(k.rate, k.burst)}
		k.keys[key] = e
	}
	e.seen = now
	k.mu.Unlock()
	return e.lim.AllowN(now, 1)
}

// GC forgets keys idle for longer than idle.
func (k *Keyed) GC(idle time.Duration) {
	cut := time.Now().Add(-idle)
	k.mu.Lock()
	for key, e := range k.keys {
		if e.seen.Before(cut) {
			delete(k.keys, key)
		}
	}
	k.mu.Unlock()
}

// Size is the number of buckets held.
func (k *Keyed) Size() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys)
}
