package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// maxLimiterKeys bounds a keyed limiter (about 200 bytes a key). Keys are
// derived by the server (a client address or /64, an authenticated member),
// but an attacker with many addresses still makes one per address.
const maxLimiterKeys = 1 << 16

// keyedLimiter is a token bucket per key (a client address, or a member
// and the session its hook is about), forgotten after a while without use.
type keyedLimiter struct {
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

func newKeyedLimiter(perSecond float64, burst int, evicted func()) *keyedLimiter {
	if burst < 1 {
		burst = 1
	}
	return &keyedLimiter{rate: rate.Limit(perSecond), burst: burst, max: maxLimiterKeys, evicted: evicted, keys: map[string]*keyedEntry{}}
}

// allow takes a token for key.
func (k *keyedLimiter) allow(key string) bool {
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

// gc forgets keys idle for longer than idle.
func (k *keyedLimiter) gc(idle time.Duration) {
	cut := time.Now().Add(-idle)
	k.mu.Lock()
	for key, e := range k.keys {
		if e.seen.Before(cut) {
			delete(k.keys, key)
		}
	}
	k.mu.Unlock()
}

// size is the number of buckets held.
func (k *keyedLimiter) size() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys)
}
