package delivery

import "time"

// SetStuckAfter sets how long a commit runs before the shard's other
// senders stop waiting for it, until the returned restore runs.
func SetStuckAfter(d time.Duration) (restore func()) {
	old := stuckAfter
	stuckAfter = d
	return func() { stuckAfter = old }
}
