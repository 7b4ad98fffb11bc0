package bench

import (
	"math"
	"slices"
	"time"
)

// Latency summarises one latency distribution. Every sample is kept (they
// fit in memory: 8 bytes each), so the percentiles are exact nearest-rank
// values, not histogram estimates.
type Latency struct {
	Count  int     `json:"count"`
	MinMs  float64 `json:"minMs"`
	MeanMs float64 `json:"meanMs"`
	P50Ms  float64 `json:"p50Ms"`
	P95Ms  float64 `json:"p95Ms"`
	P99Ms  float64 `json:"p99Ms"`
	P999Ms float64 `json:"p999Ms"`
	MaxMs  float64 `json:"maxMs"`
}

// Summarize sorts samples in place and summarises them. An empty slice
// gives the zero Latency.
func Summarize(samples []time.Duration) Latency {
	if len(samples) == 0 {
		return Latency{}
	}
	slices.Sort(samples)
	var sum float64
	for _, s := range samples {
		sum += float64(s)
	}
	return Latency{
		Count:  len(samples),
		MinMs:  ms(samples[0]),
		MeanMs: sum / float64(len(samples)) / float64(time.Millisecond),
		P50Ms:  ms(Percentile(samples, 50)),
		P95Ms:  ms(Percentile(samples, 95)),
		P99Ms:  ms(Percentile(samples, 99)),
		P999Ms: ms(Percentile(samples, 99.9)),
		MaxMs:  ms(samples[len(samples)-1]),
	}
}

// Percentile returns the nearest-rank p-th percentile (0 < p ≤ 100) of
// sorted: the smallest sample such that at least p% of the samples are
// less than or equal to it. It returns 0 for an empty slice; p ≤ 0 gives
// the minimum.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	// Rounding guards against 99.9/100*1000 = 999.0000000000001.
	rank := int(math.Ceil(math.Round(p/100*float64(n)*1e9) / 1e9))
	rank = min(max(rank, 1), n)
	return sorted[rank-1]
}

func ms(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Microsecond)) / 1000
}
