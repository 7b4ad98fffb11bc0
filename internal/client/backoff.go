package client

import (
	"math/rand/v2"
	"time"
)

// Backoff computes reconnection delays: exponential growth from Min to Max
// with "equal jitter" (half fixed, half random), so that many clients cut off
// by one broker do not all come back at the same instant.
type Backoff struct {
	Min time.Duration // zero means 250ms
	Max time.Duration // zero means 30s
}

// Delay is the wait before attempt n (n ≥ 1 counts consecutive failures).
func (b Backoff) Delay(n int) time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 250 * time.Millisecond
	}
	if hi <= 0 {
		hi = 30 * time.Second
	}
	if hi < lo {
		hi = lo
	}
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	half := d / 2
	return half + rand.N(half+1)
}
