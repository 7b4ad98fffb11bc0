package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
)

// WriteJSON writes the result as indented JSON.
func WriteJSON(w io.Writer, r Result) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the result as aligned text tables.
func WriteTable(w io.Writer, r Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := r.Params
	title := fmt.Sprintf("meshbench %s", r.Mode)
	switch r.Mode {
	case ModeBurst, ModeBroadcast:
		title += fmt.Sprintf(" — %d peers × %d messages of %d bytes", p.Peers, p.Messages, p.Size)
	case ModeRate:
		title += fmt.Sprintf(" — %d peers, %.0f msg/s for %gs, %d bytes", p.Peers, p.Rate, p.DurationSec, p.Size)
	case ModeConns:
		title += fmt.Sprintf(" — %d connections, %d sessions per member, concurrency %d", p.Conns, p.SessionsPerMember, p.Concurrency)
	}
	fmt.Fprintf(tw, "%s, peers on %d of %d nodes, started %s\n", title, p.Nodes, len(r.Nodes), r.StartedAt.Format("2006-01-02 15:04:05Z"))
	for _, k := range slices.Sorted(maps.Keys(r.Meta)) {
		fmt.Fprintf(tw, "%s:\t%s\n", k, r.Meta[k])
	}
	if r.Interrupted {
		fmt.Fprintln(tw, "INTERRUPTED: partial results")
	}

	if d := r.Delivery; d != nil {
		fmt.Fprintln(tw)
		fmt.Fprintf(tw, "sent\t%d of %d\tacked %d, rejected %s, not acked %d, unsent %d\n",
			d.Sent, d.Messages, d.Acked, counts(d.Rejected), d.NotAcked, d.Unsent)
		fmt.Fprintf(tw, "delivered\t%d of %d\t%.2f%%\n", d.Delivered, d.Expected, d.DeliveredPct)
		if da := r.DuplicateAfter; da != nil {
			fmt.Fprintf(tw, "duplicates\t%d\t%s to %s after the first push (p50 %s)\n", d.Duplicates, millis(da.MinMs), millis(da.MaxMs), millis(da.P50Ms))
		} else {
			fmt.Fprintf(tw, "duplicates\t%d\t\n", d.Duplicates)
		}
		fmt.Fprintf(tw, "missing\t%d\t\n", d.Missing)
		if d.Unknown+d.Misrouted+d.Corrupted+d.StrayAcks > 0 {
			fmt.Fprintf(tw, "anomalies\tunknown %d, misrouted %d, corrupted %d, stray acks %d\t\n", d.Unknown, d.Misrouted, d.Corrupted, d.StrayAcks)
		}
		if len(d.ErrorFrames) > 0 || len(d.Disconnects) > 0 {
			fmt.Fprintf(tw, "errors\tframes %s, disconnects %s\t\n", counts(d.ErrorFrames), counts(d.Disconnects))
		}
		if d.CrossNodePct > 0 {
			fmt.Fprintf(tw, "cross-node\t%.1f%% of messages\t\n", d.CrossNodePct)
		}
	}
	if t := r.Timing; t != nil {
		drained := "drained"
		if !t.Drained {
			drained = "NOT drained"
		}
		fmt.Fprintf(tw, "drained in\t%s\t%s; first send to last push\n", seconds(t.DrainedInSec), drained)
		fmt.Fprintf(tw, "sending took\t%s\t%.0f sends/s, %.0f deliveries/s\n", seconds(t.SendSec), t.SendsPerSec, t.DeliveriesPerSec)
		fmt.Fprintf(tw, "set-up\tprepare %s, connect %s\t\n", seconds(t.PrepareSec), seconds(t.ConnectSec))
	}
	if pw := r.PGWrites; pw != nil {
		fmt.Fprintf(tw, "postgres\t%.2f row writes, %.3f transactions per delivered message\t%d writes (%s), %d transactions; read %s after the drain, once still\n",
			pw.WritesPerMsg, pw.XactsPerMsg, pw.RowWrites, tableWrites(pw.Tables), pw.Transactions, seconds(pw.WaitSec))
	}
	if pw := r.PGWrites; pw != nil && len(pw.Statements) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintf(tw, "statement\tshare of exec\tcalls\trows\texec\tjit\tpg_stat_statements, first send to drain\n")
		for _, st := range pw.Statements {
			fmt.Fprintf(tw, "\t%.1f%%\t%d\t%d\t%.0f ms\t%.0f ms\t%s\n", st.SharePct, st.Calls, st.Rows, st.ExecMs, st.JITMs, st.Query)
		}
	}
	if c := r.Conns; c != nil {
		fmt.Fprintln(tw)
		fmt.Fprintf(tw, "opened\t%d of %d\tin %d meshes, %d members; failed %s; dropped while idle %s\n",
			c.Opened, c.Requested, c.Meshes, c.Members, counts(c.Failed), counts(c.Dropped))
		fmt.Fprintf(tw, "hello rate\t%.0f hellos/s\t%d in %s (dial + signed hello → hello_ack)\n", c.HellosPerSec, c.Opened, seconds(c.ElapsedSec))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	var rows [][2]any
	if r.SendToAck != nil {
		rows = append(rows, [2]any{"send→ack", *r.SendToAck}, [2]any{"send→push", *r.SendToPush})
	}
	if r.SendToPushSameNode != nil && r.SendToPushCrossNode != nil {
		rows = append(rows, [2]any{"  same node", *r.SendToPushSameNode}, [2]any{"  cross node", *r.SendToPushCrossNode})
	}
	if r.SendLag != nil {
		rows = append(rows, [2]any{"send lag", *r.SendLag})
	}
	if r.Conns != nil {
		rows = append(rows, [2]any{"hello", r.Conns.HelloLatency})
	}
	if len(rows) > 0 {
		fmt.Fprintln(w)
		if r.LatencyFrom != "" {
			fmt.Fprintf(w, "latency measured from the %s\n", r.LatencyFrom)
		}
		fmt.Fprintln(tw, "latency\tcount\tp50\tp95\tp99\tp99.9\tmax\tmean\t")
		for _, row := range rows {
			l := row[1].(Latency)
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", row[0], l.Count,
				millis(l.P50Ms), millis(l.P95Ms), millis(l.P99Ms), millis(l.P999Ms), millis(l.MaxMs), millis(l.MeanMs))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}

	if c := r.Conns; c != nil {
		fmt.Fprintln(w)
		fmt.Fprintln(tw, "node\tconns\tRSS before\tRSS after\tper connection\tFDs before\tFDs after\t")
		for _, n := range c.PerNode {
			if n.Error != "" {
				fmt.Fprintf(tw, "%s\t%d\t%s\t\t\t\t\t\n", n.Name, n.Conns, n.Error)
				continue
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%.1f KiB\t%d\t%d\t\n", n.Name, n.Conns, mib(n.RSSBeforeBytes), mib(n.RSSAfterBytes),
				float64(n.RSSPerConnBytes)/1024, n.FDsBefore, n.FDsAfter)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}

	fmt.Fprintln(w)
	fmt.Fprintln(tw, "process\tpeak RSS\tstart RSS\tend RSS\tpeak FDs\tCPU\tsamples\tsource\t")
	procs := append(slices.Clone(r.Nodes), r.Generator)
	if r.Postgres != nil {
		procs = append(procs, *r.Postgres)
	}
	for _, n := range procs {
		extra := n.Source
		if n.Errors > 0 {
			extra += fmt.Sprintf(" (%d failed: %s)", n.Errors, n.LastError)
		}
		mem := []string{mib(n.PeakRSSBytes), mib(n.StartRSSBytes), mib(n.EndRSSBytes), strconv.FormatInt(n.PeakFDs, 10)}
		if n.PeakRSSBytes == 0 && n.PeakFDs == 0 {
			mem = []string{"–", "–", "–", "–"}
		}
		fmt.Fprintf(tw, "%s\t%s\t%.1f s\t%d\t%s\t\n", n.Name, strings.Join(mem, "\t"), n.CPUSeconds, n.Samples, extra)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if h := r.Host; h.WallSeconds > 0 {
		cores := func(v float64) float64 { return v / h.WallSeconds }
		fmt.Fprintf(w, "host: %.2f of %d cores busy over %s: benchmark %.2f, kernel %.2f, other processes %.2f; load average %.2f → %.2f\n",
			cores(h.BusyCPUSeconds), h.Cores, seconds(h.WallSeconds), cores(h.BenchCPUSeconds), cores(h.KernelCPUSeconds),
			cores(h.OthersCPUSeconds), h.LoadAvgStart, h.LoadAvgEnd)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	return nil
}

// tableWrites lists each table's inserts/updates/deletes.
func tableWrites(m map[string]TableWrites) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		w := m[k]
		parts = append(parts, fmt.Sprintf("%s %d/%d/%d", strings.TrimPrefix(k, "public."), w.Inserts, w.Updates, w.Deletes))
	}
	return "ins/upd/del: " + strings.Join(parts, ", ")
}

func counts(m map[string]int64) string {
	if len(m) == 0 {
		return "0"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

func millis(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.2f s", v/1000)
	case v >= 10:
		return fmt.Sprintf("%.0f ms", v)
	case v >= 1:
		return fmt.Sprintf("%.1f ms", v)
	}
	return fmt.Sprintf("%.2f ms", v)
}

func seconds(v float64) string {
	if v < 1 {
		return fmt.Sprintf("%.0f ms", v*1000)
	}
	return fmt.Sprintf("%.2f s", v)
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
