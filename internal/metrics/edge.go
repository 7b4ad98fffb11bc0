package metrics

import "github.com/prometheus/client_golang/prometheus"

// Edge holds the series of input that a batch still failed on after the
// edge validation.
type Edge struct {
	// BatchRowsFailed counts rows Postgres refused on their own, which
	// failed alone while the rest of their batch was written. batch is
	// send, hello, mark, release or audit.
	BatchRowsFailed *prometheus.CounterVec
}

func newEdge(reg prometheus.Registerer) Edge {
	e := Edge{
		BatchRowsFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_batch_rows_failed_total",
			Help: "Rows Postgres refused on their own (data errors), failed alone while the rest of their batch was written, by batch.",
		}, []string{"batch"}),
	}
	reg.MustRegister(e.BatchRowsFailed)
	for _, b := range []string{"send", "hello", "mark", "release", "audit"} {
		e.BatchRowsFailed.WithLabelValues(b)
	}
	return e
}
