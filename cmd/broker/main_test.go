package main

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"

	"github.com/bytedance/gopkg/util/gctuner"
)

func TestTuneGC(t *testing.T) {
	prev := debug.SetGCPercent(100)
	t.Cleanup(func() {
		gctuner.Tuning(0) // stops the tuner
		debug.SetGCPercent(prev)
	})

	// The runtime has already applied an operator's GOGC; tuneGC must keep
	// it, and start no tuner.
	tuneGC(func(string) (string, bool) { return "200", true })
	if got := debug.SetGCPercent(100); got != 100 {
		t.Fatalf("GOGC set: GC percent changed to %d", got)
	}
	runtime.GC()
	runtime.GC()
	if got := debug.SetGCPercent(100); got != 100 {
		t.Fatalf("GOGC set: GC percent changed to %d after a collection", got)
	}

	tuneGC(func(string) (string, bool) { return "", false })
	if got := debug.SetGCPercent(defaultGCPercent); got != defaultGCPercent {
		t.Fatalf("GOGC unset: GC percent %d, want %d", got, defaultGCPercent)
	}
	// This test's heap is far below heapFloor: after a collection the
	// tuner raises the target (the finalizer runs after the cycle; a
	// bounded number of cycles).
	for i := 0; i < 100 && gogc(t) == defaultGCPercent; i++ {
		runtime.GC()
		runtime.Gosched()
	}
	if got := gogc(t); got <= defaultGCPercent {
		t.Fatalf("small heap: GC percent %d after collections, want above %d", got, defaultGCPercent)
	}
	// Past the floor it is the default again.
	ballast := make([]byte, heapFloor+(16<<20))
	for i := range ballast {
		if i%4096 == 0 {
			ballast[i] = 1
		}
	}
	for i := 0; i < 100 && gogc(t) != defaultGCPercent; i++ {
		runtime.GC()
		runtime.Gosched()
	}
	if got := gogc(t); got != defaultGCPercent {
		t.Fatalf("heap past the floor: GC percent %d, want %d", got, defaultGCPercent)
	}
	runtime.KeepAlive(ballast)
}

// gogc is the runtime's GC percent as it stands.
func gogc(t *testing.T) uint64 {
	t.Helper()
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		t.Fatal("no /gc/gogc:percent metric")
	}
	return s[0].Value.Uint64()
}
