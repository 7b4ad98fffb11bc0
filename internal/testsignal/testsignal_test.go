package testsignal_test

import (
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/testsignal"
)

func TestSignal(t *testing.T) {
	var s testsignal.Signal[int]
	s.Signal(1) // off: dropped
	if _, ok := s.Wait(10 * time.Millisecond); ok {
		t.Fatal("a signal before Init was kept")
	}
	s.Init()
	for i := range 2000 {
		s.Signal(i) // never blocks, keeps the newest
	}
	v, ok := s.WaitFor(time.Second, func(v int) bool { return v >= 1990 })
	if !ok || v != 1990 {
		t.Fatalf("WaitFor = %d, %v", v, ok)
	}
	s.Clear()
	go s.Signal(7)
	if v, ok := s.Wait(5 * time.Second); !ok || v != 7 {
		t.Fatalf("Wait = %d, %v", v, ok)
	}
}
