package bench

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// HostStats is the whole machine's CPU use during a run, split by who
// used it. On one shared machine, CPU used by other processes disturbs the
// measurement: a run with a large OthersCPUSeconds should be repeated.
type HostStats struct {
	Cores          int     `json:"cores"`
	WallSeconds    float64 `json:"wallSeconds"`
	BusyCPUSeconds float64 `json:"busyCpuSeconds"` // everything but idle and iowait
	// BenchCPUSeconds is what the benchmark's processes on this machine
	// used: the generator, nodes sampled through /proc, Postgres and its
	// backends.
	BenchCPUSeconds float64 `json:"benchCpuSeconds"`
	// OthersCPUSeconds is what every other user-space process used
	// (processes that live less than one sampling interval are missed).
	OthersCPUSeconds float64 `json:"othersCpuSeconds"`
	// KernelCPUSeconds is the rest: kernel threads, interrupts and
	// softirqs (loopback networking, disk flushes), mostly on the
	// benchmark's behalf.
	KernelCPUSeconds float64 `json:"kernelCpuSeconds"`
	LoadAvgStart     float64 `json:"loadAvgStart"` // 1-minute load average
	LoadAvgEnd       float64 `json:"loadAvgEnd"`
}

// hostTracker attributes the machine's CPU time to the benchmark's
// processes and to the others by scanning /proc at every sample.
type hostTracker struct {
	ours map[int]bool // the benchmark's processes; children of these count too

	mu        sync.Mutex
	started   time.Time
	busyStart float64
	loadStart float64
	last      map[int]procCPU // pid → CPU at the previous scan
	bench     float64
	others    float64
}

type procCPU struct {
	cpu  float64
	ours bool
}

func newHostTracker(ours map[int]bool) *hostTracker {
	busy, err := hostBusy()
	if err != nil {
		return nil
	}
	h := &hostTracker{ours: ours, started: time.Now(), busyStart: busy, loadStart: loadAvg(), last: map[int]procCPU{}}
	h.scan() // baseline
	h.bench, h.others = 0, 0
	return h
}

// scan adds the CPU each process used since the previous scan. A process
// first seen now started during the run: all of its CPU time counts.
func (h *hostTracker) scan() {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	first := len(h.last) == 0
	seen := make(map[int]procCPU, len(h.last))
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cpu, ppid, err := procStat(pid)
		if err != nil || pid == 2 || ppid == 2 {
			continue // gone, or a kernel thread (kthreadd's children)
		}
		pc := procCPU{cpu: cpu, ours: h.ours[pid] || h.ours[ppid]}
		seen[pid] = pc
		if first {
			continue
		}
		delta := cpu
		if prev, ok := h.last[pid]; ok {
			delta = cpu - prev.cpu
		}
		if pc.ours {
			h.bench += delta
		} else {
			h.others += delta
		}
	}
	h.last = seen
}

func (h *hostTracker) stats() HostStats {
	h.scan()
	h.mu.Lock()
	defer h.mu.Unlock()
	st := HostStats{Cores: runtime.NumCPU(), WallSeconds: time.Since(h.started).Seconds(),
		BenchCPUSeconds: h.bench, OthersCPUSeconds: h.others, LoadAvgStart: h.loadStart, LoadAvgEnd: loadAvg()}
	if busy, err := hostBusy(); err == nil {
		st.BusyCPUSeconds = busy - h.busyStart
		st.KernelCPUSeconds = max(st.BusyCPUSeconds-st.BenchCPUSeconds-st.OthersCPUSeconds, 0)
	}
	return st
}

// hostBusy reads the machine's busy CPU seconds (all but idle and iowait)
// from /proc/stat.
func hostBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 8 || f[0] != "cpu" {
		return 0, errors.New("unexpected /proc/stat")
	}
	var busy int64
	// user nice system idle iowait irq softirq steal [guest guest_nice]:
	// guest time is already included in user and nice.
	for i, v := range f[1:min(len(f), 9)] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		if i != 3 && i != 4 {
			busy += n
		}
	}
	return float64(busy) / clockTicks, nil
}

// loadAvg reads the 1-minute load average.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	first, _, _ := strings.Cut(string(b), " ")
	v, _ := strconv.ParseFloat(first, 64)
	return v
}
