package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// keyedLimiter is a token bucket per key (an address, or a hook's pid and
// cwd), forgotten after a while without use.
type keyedLimiter struct {
	rate  rate.Limit
	burst int

	mu   sync.Mutex
	keys map[string]*keyedEntry
}

type keyedEntry struct {
	lim  *rate.Limiter
	seen time.Time
}

func newKeyedLimiter(perSecond float64, burst int) *keyedLimiter {
	if burst < 1 {
		burst = 1
	}
	return &keyedLimiter{rate: rate.Limit(perSecond), burst: burst, keys: map[string]*keyedEntry{}}
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
