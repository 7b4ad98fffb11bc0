package bench

import (
	"errors"
	"fmt"
	"image/color"
	"io"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// plotPoints bounds the points of one curve; the samples are thinned
// evenly by rank, and the last sample (the maximum) is always kept.
const plotPoints = 2000

// cdf turns sorted samples into (latency in ms, fraction ≤ latency)
// points. Latencies are clamped to 1 µs so they fit a log axis.
func cdf(sorted []time.Duration) plotter.XYs {
	n := len(sorted)
	if n == 0 {
		return nil
	}
	step := max(1, n/plotPoints)
	pts := make(plotter.XYs, 0, n/step+2)
	add := func(i int) {
		pts = append(pts, plotter.XY{X: max(float64(sorted[i])/float64(time.Millisecond), 0.001), Y: float64(i+1) / float64(n)})
	}
	for i := 0; i < n-1; i += step {
		add(i)
	}
	add(n - 1)
	return pts
}

// WritePlot renders the latency distribution as a PNG: the cumulative
// distribution of send→push (and send→ack) on a logarithmic time axis, or
// of the hello latency for a conns run. It uses gonum.org/v1/plot.
func WritePlot(w io.Writer, r Result) error {
	type curve struct {
		name    string
		samples []time.Duration
		sum     *Latency
		color   color.Color
		dashed  bool
	}
	var curves []curve
	switch {
	case r.SendToPush != nil:
		curves = append(curves,
			curve{"send→push", r.samples.sendToPush, r.SendToPush, color.RGBA{R: 0x1f, G: 0x5f, B: 0xbf, A: 0xff}, false},
			curve{"send→ack", r.samples.sendToAck, r.SendToAck, color.RGBA{R: 0xd6, G: 0x6a, B: 0x1a, A: 0xff}, true})
	case r.Conns != nil:
		curves = append(curves, curve{"connect + hello", r.samples.hello, &r.Conns.HelloLatency, color.RGBA{R: 0x1f, G: 0x5f, B: 0xbf, A: 0xff}, false})
	}
	if len(curves) == 0 || len(curves[0].samples) == 0 {
		return errors.New("plot: the run has no latency samples")
	}

	p := plot.New()
	p.Title.Text = plotTitle(r)
	p.X.Label.Text = "latency (ms, log scale)"
	p.Y.Label.Text = "fraction of samples ≤ latency"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	p.Add(plotter.NewGrid())
	// The curves rise to the right: the top left corner is free.
	p.Legend.Top = true
	p.Legend.Left = true
	for _, c := range curves {
		if len(c.samples) == 0 {
			continue
		}
		line, err := plotter.NewLine(cdf(c.samples))
		if err != nil {
			return fmt.Errorf("plot: %w", err)
		}
		line.Color = c.color
		line.Width = vg.Points(1.5)
		if c.dashed {
			line.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
		}
		p.Add(line)
		p.Legend.Add(fmt.Sprintf("%s  p50 %s  p99 %s  max %s", c.name, millis(c.sum.P50Ms), millis(c.sum.P99Ms), millis(c.sum.MaxMs)), line)
	}
	wt, err := p.WriterTo(9*vg.Inch, 5*vg.Inch, "png")
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	_, err = wt.WriteTo(w)
	return err
}

func plotTitle(r Result) string {
	p := r.Params
	switch r.Mode {
	case ModeRate:
		return fmt.Sprintf("meshbench rate: %d peers, %.0f msg/s for %gs on %d nodes (from intended send time)", p.Peers, p.Rate, p.DurationSec, p.Nodes)
	case ModeConns:
		return fmt.Sprintf("meshbench conns: %d connections on %d nodes", p.Conns, p.Nodes)
	}
	return fmt.Sprintf("meshbench %s: %d peers × %d messages on %d nodes", r.Mode, p.Peers, p.Messages, p.Nodes)
}
