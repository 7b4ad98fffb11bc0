package delivery

import "time"

// FillHandled fills the engine's set of handled rows to its bound with
// keys no real row has (negative message ids).
func FillHandled(e *Engine) {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	for i := int64(len(e.taken)); i < maxTaken; i++ {
		e.taken[Key{MessageID: -1 - i, MemberID: "filler"}] = now
	}
}

// SetStuckAfter sets how long a commit runs before the shard's other
// senders stop waiting for it, until the returned restore runs.
func SetStuckAfter(d time.Duration) (restore func()) {
	old := stuckAfter
	stuckAfter = d
	return func() { stuckAfter = old }
}
