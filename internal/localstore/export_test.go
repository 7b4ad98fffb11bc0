package localstore

// SetMaxOutbox lowers the outbox bound for a test.
func (s *Store) SetMaxOutbox(n int) { s.maxOutbox = n }
