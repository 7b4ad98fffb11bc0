package metrics

import "github.com/prometheus/client_golang/prometheus"

// Bounds counts what crosses the limits that keep one client, member,
// node or database role from growing another's memory or state: every
// input a bound refuses is counted here.
type Bounds struct {
	// ListPeersThrottled counts list_peers requests held back by the
	// per-session rate limit.
	ListPeersThrottled prometheus.Counter
	// PeersTrimmed counts peers_list answers whose peers' free text was
	// shortened to fit the 1 MiB frame (reason: trimmed, or truncated when
	// even minimal peers did not fit and the list was cut).
	PeersTrimmed *prometheus.CounterVec
	// GossipEntriesDropped counts presence entries refused from other
	// nodes, by reason (not_owner, invalid, too_large, over_cap).
	GossipEntriesDropped *prometheus.CounterVec
	// GossipCommandsDropped counts cluster commands refused (invalid, or
	// for a presence this node does not own).
	GossipCommandsDropped prometheus.Counter
	// GossipRefused counts gossip streams and packets memberlist refused:
	// not encrypted with this cluster's key, or undecodable.
	GossipRefused prometheus.Counter
	// GossipStateBytes is the size of the last push-pull state this node
	// sent; GossipStateWarnings counts states above 60 % of memberlist's
	// limit.
	GossipStateBytes    prometheus.Gauge
	GossipStateWarnings prometheus.Counter
	// RelayRejected counts relay notifications refused, by reason
	// (bad_seal: an envelope not sealed with the cluster's key; malformed).
	RelayRejected *prometheus.CounterVec
	// RevocationsRefuted counts revocation notices for members the
	// database says are not revoked.
	RevocationsRefuted prometheus.Counter
}

func newBounds() Bounds {
	return Bounds{
		ListPeersThrottled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_list_peers_throttled_total", Help: "list_peers requests delayed by the per-session rate limit."}),
		PeersTrimmed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_peers_list_trimmed_total", Help: "peers_list answers shortened to fit 1 MiB, by how."}, []string{"how"}),
		GossipEntriesDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_gossip_entries_dropped_total", Help: "Presence entries from other nodes refused, by reason."}, []string{"reason"}),
		GossipCommandsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_gossip_commands_dropped_total", Help: "Cluster commands refused: invalid, or for a presence this node does not own."}),
		GossipRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_gossip_refused_total", Help: "Gossip streams and packets refused by memberlist (not encrypted with the cluster key, or undecodable)."}),
		GossipStateBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "broker_gossip_state_bytes", Help: "Size of the last push-pull state this node sent."}),
		GossipStateWarnings: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_gossip_state_warnings_total", Help: "Push-pull states above 60% of memberlist's limit."}),
		RelayRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_relay_rejected_total", Help: "Relay notifications refused, by reason."}, []string{"reason"}),
		RevocationsRefuted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "broker_revocations_refuted_total", Help: "Revocation notices for members the database says are not revoked."}),
	}
}

func (b *Bounds) collectors() []prometheus.Collector {
	for _, r := range []string{"not_owner", "invalid", "too_large", "over_cap"} {
		b.GossipEntriesDropped.WithLabelValues(r)
	}
	for _, r := range []string{"bad_seal", "malformed"} {
		b.RelayRejected.WithLabelValues(r)
	}
	return []prometheus.Collector{b.ListPeersThrottled, b.PeersTrimmed, b.GossipEntriesDropped, b.GossipCommandsDropped,
		b.GossipRefused, b.GossipStateBytes, b.GossipStateWarnings, b.RelayRejected, b.RevocationsRefuted}
}
