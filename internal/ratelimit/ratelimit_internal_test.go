package ratelimit

import (
	"strconv"
	"testing"
)

// A keyed limiter holds at most max buckets, whatever the number of keys
// it is asked about; each bucket dropped to make room is counted, and a
// new key still gets its first token.
func TestKeyedLimiterBounded(t *testing.T) {
	evicted := 0
	k := New(1, 1, func() { evicted++ })
	k.max = 100
	for i := 0; i < 1000; i++ {
		if !k.Allow("addr-" + strconv.Itoa(i)) {
			t.Fatalf("key %d refused its first request", i)
		}
		if k.Size() > k.max {
			t.Fatalf("%d buckets held, bound %d", k.Size(), k.max)
		}
	}
	if evicted != 900 {
		t.Fatalf("%d evictions counted, want 900", evicted)
	}
	if !k.Allow("fresh") || k.Allow("fresh") {
		t.Fatal("a bucket of burst 1 does not limit its second request")
	}
}
