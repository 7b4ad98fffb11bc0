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
