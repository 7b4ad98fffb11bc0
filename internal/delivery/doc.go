// Package delivery is the engine that moves envelopes from the durable
// queue to this node's sessions: the committer (group commits, fast-path
// leases and envelopes), claims, leases and their release, the acker that
// marks rows delivered, and expiry. It owns the delivery rules and nothing
// else: the queue is a Queue (store.Store on Postgres), the sessions are
// Recipients and Senders (the WebSocket front implements them), and what
// it knows of the cluster comes through a Directory.
package delivery
