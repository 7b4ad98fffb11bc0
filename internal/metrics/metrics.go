// Package metrics defines the broker's Prometheus series. A Metrics value is
// registered on an injected registry, so several nodes can run in one
// process (tests, `broker dev`) without colliding.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics holds every collector of a node.
type Metrics struct {
	ConnectionsTotal    prometheus.Counter
	ConnectionsRejected *prometheus.CounterVec // reason
	ConnectionsActive   prometheus.Gauge
	MessagesRouted      *prometheus.CounterVec // priority
	MessagesRejected    *prometheus.CounterVec // reason
	MessagesDelivered   prometheus.Counter
	MessagesExpired     prometheus.Counter
	QueueDepth          prometheus.Gauge
	TTLSweeps           prometheus.Counter
	StatusFlips         prometheus.Counter
	HookRequests        prometheus.Counter
	HookRateLimited     prometheus.Counter
	DBHealthy           prometheus.Gauge
	CommitToPush        prometheus.Histogram
	CommitDuration      prometheus.Histogram
	CommitBatchSize     prometheus.Histogram
	FramesPerWrite      prometheus.Histogram
	Claims              *prometheus.CounterVec // reason: local, notify, backlog, sweep, status, reattach
	Recovered           *prometheus.CounterVec // via: backlog, sweep
	SlowConsumers       prometheus.Counter
	ClientCloses        *prometheus.CounterVec // reason
	ClusterMembers      prometheus.Gauge
	PresenceEntries     prometheus.Gauge
	RelaySent           prometheus.Counter
	RelayReceived       prometheus.Counter
	RelayLag            prometheus.Histogram
	RelayReconnects     prometheus.Counter
	GossipDropped       prometheus.Counter
	AuditDropped        prometheus.Counter
	LimiterEvicted      prometheus.Counter
	MemberCacheEvicted  prometheus.Counter
	ClockOffset         prometheus.Gauge
	Edge
	Bounds
	// RequestsLimited counts requests refused by a per-session rate limit,
	// by frame type.
	RequestsLimited *prometheus.CounterVec
	// ClaimShrinks counts claim statements that ran out of time, after
	// which the rows one statement asks for were halved; ClaimBudget is
	// that bound now (it doubles back after each claim that finishes).
	ClaimShrinks prometheus.Counter
	ClaimBudget  prometheus.Gauge
	// MarkShrinks counts delivery-mark statements that ran out of time,
	// after which the keys one statement writes were halved.
	MarkShrinks prometheus.Counter
	// TakenOver counts rows a takeover leased from another connection
	// (lease takeover on reattach).
	TakenOver prometheus.Counter
	// ParkedOverflow counts fast-path rows (remote envelopes, and local
	// rows held behind a claim) that met a claim in flight when their
	// member's bound was full: left to a claim.
	ParkedOverflow prometheus.Counter
	// HandledFull counts fast-path rows left to a claim because the
	// engine's set of rows it handled (which keeps a claim and an envelope
	// from both pushing one) was at its bound.
	HandledFull prometheus.Counter
	// ClaimsGivenBack counts claims whose rows went back to the queue
	// unpushed because a release of the member's rows began while they
	// ran (they could have overtaken the released rows).
	ClaimsGivenBack prometheus.Counter
}

// latencyBuckets span 100 µs to 30 s.
var latencyBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

// New creates the collectors and registers them (and the Go and process
// collectors) on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		ConnectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_connections_total", Help: "WebSocket connections accepted (before the hello)."}),
		ConnectionsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_connections_rejected_total", Help: "Hellos rejected, by reason."}, []string{"reason"}),
		ConnectionsActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_connections_active", Help: "Authenticated sessions on this node."}),
		MessagesRouted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_messages_routed_total", Help: "Envelopes pushed to a session, by priority."}, []string{"priority"}),
		MessagesRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_messages_rejected_total", Help: "Sends rejected, by reason."}, []string{"reason"}),
		MessagesDelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_messages_delivered_total", Help: "Delivery rows marked delivered by this node."}),
		MessagesExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_messages_expired_total", Help: "Delivery rows that reached MESSAGE_TTL undelivered."}),
		QueueDepth: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_queue_depth", Help: "Delivery rows waiting, cluster-wide."}),
		TTLSweeps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_ttl_sweeps_total", Help: "Status TTL sweeps run."}),
		StatusFlips: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_ttl_status_flips_total", Help: "Sessions flipped from working to idle by the TTL sweep."}),
		HookRequests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_hook_requests_total", Help: "POST /hook/set-status requests."}),
		HookRateLimited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_hook_requests_rate_limited_total", Help: "Hook requests refused with 429."}),
		DBHealthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_db_healthy", Help: "1 when Postgres answers, else 0."}),
		CommitToPush: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "broker_commit_to_push_seconds", Help: "From a message's commit to its push being written.", Buckets: latencyBuckets}),
		CommitDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "broker_send_commit_seconds", Help: "Duration of one group commit of sends.", Buckets: latencyBuckets}),
		CommitBatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "broker_send_batch_size", Help: "Messages per group commit.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)}),
		FramesPerWrite: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "broker_ws_frames_per_write", Help: "Frames a session's write loop handed the kernel in one write (corked).", Buckets: prometheus.ExponentialBuckets(1, 2, 10)}),
		Claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_delivery_claims_total", Help: "Delivery rows handed to a session, by what triggered the claim."}, []string{"reason"}),
		Recovered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_relay_recovered_total", Help: "Rows delivered by a backlog or sweep re-scan rather than a notification."}, []string{"via"}),
		SlowConsumers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_slow_consumers_total", Help: "Sessions closed because they stopped reading."}),
		ClientCloses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_session_closes_total", Help: "Sessions closed, by reason."}, []string{"reason"}),
		ClusterMembers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_cluster_members", Help: "Live nodes in the gossip cluster, this one included."}),
		PresenceEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_presence_entries", Help: "Presence entries in this node's replica (live and grace)."}),
		RelaySent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_relay_notifications_sent_total", Help: "NOTIFY payloads sent."}),
		RelayReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_relay_notifications_received_total", Help: "Relay notifications received."}),
		RelayLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "broker_relay_lag_seconds", Help: "From NOTIFY to its receipt on this node.", Buckets: latencyBuckets}),
		RelayReconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_relay_listens_total", Help: "Times the relay listener (re)started listening."}),
		GossipDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_gossip_invalid_total", Help: "Gossip messages dropped as invalid."}),
		LimiterEvicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_limiter_keys_evicted_total", Help: "Rate-limit buckets (per client address or member) dropped because the limiter was full."}),
		MemberCacheEvicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_member_cache_evicted_total", Help: "Mesh member lists dropped from the member cache because it was full."}),
		AuditDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_audit_dropped_total", Help: "Audit events dropped because the buffer was full."}),
		ClockOffset: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_clock_offset_seconds", Help: "Postgres clock minus this node's clock, as last measured."}),
	}
	reg.MustRegister(
		m.ConnectionsTotal, m.ConnectionsRejected, m.ConnectionsActive, m.MessagesRouted, m.MessagesRejected,
		m.MessagesDelivered, m.MessagesExpired, m.QueueDepth, m.TTLSweeps, m.StatusFlips, m.HookRequests,
		m.HookRateLimited, m.DBHealthy, m.CommitToPush, m.CommitDuration, m.CommitBatchSize, m.FramesPerWrite, m.Claims,
		m.Recovered, m.SlowConsumers, m.ClientCloses, m.ClusterMembers, m.PresenceEntries, m.RelaySent,
		m.RelayReceived, m.RelayLag, m.RelayReconnects, m.GossipDropped, m.AuditDropped, m.LimiterEvicted, m.MemberCacheEvicted, m.ClockOffset,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m.Edge = newEdge(reg)
	m.Bounds = newBounds()
	reg.MustRegister(m.Bounds.collectors()...)
	m.RequestsLimited = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "broker_requests_rate_limited_total", Help: "Requests over a per-session rate limit answered rate_limited (list_members, message_status), by frame type; list_peers requests held back by their pacing are counted in broker_list_peers_throttled_total."}, []string{"type"})
	reg.MustRegister(m.RequestsLimited)
	m.ClaimShrinks = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_claim_shrinks_total", Help: "Claim statements that ran out of time; the next ones ask for half the rows."})
	m.ClaimBudget = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "broker_delivery_claim_budget_rows", Help: "Rows one claim statement may ask for now (halved on a claim timeout, doubled back on success)."})
	m.TakenOver = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_taken_over_total", Help: "Delivery rows a session that attached took over from another connection's lease."})
	m.ParkedOverflow = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_parked_overflow_total", Help: "Fast-path rows (envelopes, and this node's rows held behind a claim) that met a claim in flight past their member's bound (left to a claim)."})
	m.MarkShrinks = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_mark_shrinks_total", Help: "Delivery-mark statements that ran out of time; the next ones write half the keys."})
	m.HandledFull = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_handled_set_full_total", Help: "Fast-path rows left to a claim because the set of rows the engine handled in the last two minutes was at its bound (262,144)."})
	m.ClaimsGivenBack = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "broker_delivery_claims_given_back_total", Help: "Claims for a member whose rows went back unpushed because a release of its rows began while the claim ran (so as not to overtake them)."})
	reg.MustRegister(m.ClaimShrinks, m.ClaimBudget, m.MarkShrinks, m.TakenOver, m.ParkedOverflow, m.HandledFull, m.ClaimsGivenBack)
	// Pre-create the label values operators alert on, so they export 0.
	for _, r := range []string{"malformed", "timestamp_skew", "bad_signature", "unauthorized", "capacity", "replayed", "hello_timeout"} {
		m.ConnectionsRejected.WithLabelValues(r)
	}
	for _, r := range []string{"malformed", "unknown_recipient", "too_large", "rate_limited", "no_recipients", "unavailable"} {
		m.MessagesRejected.WithLabelValues(r)
	}
	for _, p := range []string{"now", "next", "low"} {
		m.MessagesRouted.WithLabelValues(p)
	}
	return m
}
