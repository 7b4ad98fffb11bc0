package server

import (
	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/protocol"
)

// message_status costs a Postgres query per request: a session gets at
// most statusPerSec answers from the database a second (burst
// statusBurst). A request over the rate is answered at once with
// message_status_result error "rate_limited" (the result frame a v0.1
// client already waits for, with an error as for "not_found"), and counted
// in broker_requests_rate_limited_total{type="message_status"}. The
// answers still count against the session's outgoing byte budget, so a
// flooder that does not read them is closed slow_consumer.
const (
	statusPerSec = 10
	statusBurst  = 20
)

// allowMessageStatus reports whether the session may query a message's
// status now. The limiter is made on the first request: most sessions
// never ask. Called from the read loop only.
func (ss *session) allowMessageStatus() bool {
	if ss.statusLimit == nil {
		ss.statusLimit = rate.NewLimiter(statusPerSec, statusBurst)
	}
	if ss.statusLimit.Allow() {
		return true
	}
	ss.s.m.RequestsLimited.WithLabelValues(protocol.TypeMessageStatus).Inc()
	return false
}
