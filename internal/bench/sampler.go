package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// NodeStats is what the sampler saw of one process.
type NodeStats struct {
	Name          string `json:"name"`
	URL           string `json:"url,omitempty"`
	Source        string `json:"source"` // "/proc/<pid>" or the /metrics URL
	Samples       int    `json:"samples"`
	Errors        int    `json:"errors,omitempty"`
	LastError     string `json:"lastError,omitempty"`
	StartRSSBytes int64  `json:"startRssBytes"`
	PeakRSSBytes  int64  `json:"peakRssBytes"`
	EndRSSBytes   int64  `json:"endRssBytes"`
	StartFDs      int64  `json:"startFds"`
	PeakFDs       int64  `json:"peakFds"`
	EndFDs        int64  `json:"endFds"`
	// CPUSeconds is the user+system CPU time the process used between
	// the first and the last sample: with everything on one machine, it
	// shows who used the cores.
	CPUSeconds float64 `json:"cpuSeconds"`

	firstCPU float64
}

// usage is one reading of a process.
type usage struct {
	rss, fds int64
	cpu      float64 // seconds since the process started
}

// probe reads a process's RSS and open file descriptors.
type probe interface {
	read(ctx context.Context) (usage, error)
	source() string
}

// procProbe reads /proc/<pid> of a process on this machine.
type procProbe struct{ pid int }

func (p procProbe) source() string { return "/proc/" + strconv.Itoa(p.pid) }

func (p procProbe) read(context.Context) (usage, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
	if err != nil {
		return usage{}, fmt.Errorf("read status: %w", err)
	}
	rss, err := vmRSS(status)
	if err != nil {
		return usage{}, err
	}
	fds, err := countFDs(fmt.Sprintf("/proc/%d/fd", p.pid))
	if err != nil {
		return usage{}, err
	}
	cpu, _, err := procStat(p.pid)
	if err != nil {
		return usage{}, err
	}
	return usage{rss: rss, fds: fds, cpu: cpu}, nil
}

// clockTicks is USER_HZ, the unit of the CPU times in /proc/<pid>/stat:
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// procStat reads a process's user+system CPU seconds and its parent's pid
// from /proc/<pid>/stat.
func procStat(pid int) (cpu float64, ppid int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	return parseStat(b)
}

// parseStat parses a /proc/<pid>/stat line. The command name, in
// parentheses, may itself hold spaces and parentheses: fields are counted
// from the last ')'.
func parseStat(b []byte) (cpu float64, ppid int, err error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return 0, 0, errors.New("short stat")
	}
	ppid, err1 := strconv.Atoi(f[1])
	utime, err2 := strconv.ParseInt(f[11], 10, 64)
	stime, err3 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return 0, 0, fmt.Errorf("stat: %w", err)
	}
	return float64(utime+stime) / clockTicks, ppid, nil
}

// treeProbe reads the CPU time of a process and its direct children, such
// as a Postgres postmaster and its backends. Memory is not summed: the
// backends share Postgres's buffers, and adding their RSS would count
// that memory once per backend.
type treeProbe struct{ pid int }

func (p treeProbe) source() string {
	return "/proc/" + strconv.Itoa(p.pid) + " and children (CPU only)"
}

func (p treeProbe) read(context.Context) (usage, error) {
	cpu, _, err := procStat(p.pid)
	if err != nil {
		return usage{}, err
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return usage{}, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == p.pid {
			continue
		}
		c, ppid, err := procStat(pid)
		if err == nil && ppid == p.pid {
			cpu += c
		}
	}
	return usage{cpu: cpu}, nil
}

// vmRSS extracts VmRSS (in bytes) from a /proc/<pid>/status file.
func vmRSS(status []byte) (int64, error) {
	for line := range bytes.Lines(status) {
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("unexpected VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS: %w", err)
		}
		return kb * 1024, nil
	}
	return 0, errors.New("no VmRSS in status (a zombie?)")
}

// countFDs counts the entries of a /proc/<pid>/fd directory without
// sorting or stat-ing them.
func countFDs(dir string) (int64, error) {
	f, err := os.Open(dir)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n int64
	for {
		names, err := f.Readdirnames(4096)
		n += int64(len(names))
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// metricsProbe scrapes a node's Prometheus endpoint, which exports the
// process collector's process_resident_memory_bytes and process_open_fds.
type metricsProbe struct {
	url    string
	client *http.Client
}

func (p metricsProbe) source() string { return p.url }

// scrapeTimeout bounds one /metrics request. A failed scrape is counted
// in NodeStats.Errors and the next tick tries again.
const scrapeTimeout = 5 * time.Second

func (p metricsProbe) read(ctx context.Context) (usage, error) {
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return usage{}, err
	}
	req.Header.Set("Accept", "text/plain")
	resp, err := p.client.Do(req)
	if err != nil {
		return usage{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return usage{}, fmt.Errorf("GET %s: %s", p.url, resp.Status)
	}
	return parseProcessMetrics(io.LimitReader(resp.Body, 16<<20))
}

// parseProcessMetrics reads the process collector's gauges from the
// Prometheus text exposition format.
func parseProcessMetrics(r io.Reader) (usage, error) {
	var u usage
	var gotRSS, gotFDs bool
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		switch name {
		case "process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total":
		default:
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return usage{}, fmt.Errorf("%s: %w", name, err)
		}
		switch name {
		case "process_resident_memory_bytes":
			u.rss, gotRSS = int64(v), true
		case "process_open_fds":
			u.fds, gotFDs = int64(v), true
		default:
			u.cpu = v
		}
	}
	if err := sc.Err(); err != nil {
		return usage{}, err
	}
	if !gotRSS || !gotFDs {
		return usage{}, errors.New("no process_resident_memory_bytes/process_open_fds in /metrics (process collector not registered?)")
	}
	return u, nil
}

// metricsURL maps a node's ws://host:port/ws URL to its /metrics URL.
func metricsURL(wsURL string) (string, error) {
	u, err := url.Parse(wsURL)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	default:
		return "", fmt.Errorf("%q: want a ws:// or wss:// URL", wsURL)
	}
	u.Path, u.RawQuery, u.Fragment = "/metrics", "", ""
	return u.String(), nil
}

// sampler reads every node (and the generator itself) at a fixed interval
// and keeps start, peak and end values.
type sampler struct {
	nodes  int // probes[:nodes] are the targets, then this process, then Postgres
	probes []probe
	stats  []NodeStats // guarded by mu
	mu     sync.Mutex

	cancel context.CancelFunc
	done   chan struct{}

	host *hostTracker // nil when /proc/stat cannot be read
}

// newSampler builds one probe per target, then one for this process,
// then, when postgresPID is set, one for Postgres.
func newSampler(targets []Target, postgresPID int, client *http.Client) (*sampler, error) {
	s := &sampler{}
	for _, t := range targets {
		var p probe
		if t.PID > 0 {
			p = procProbe{pid: t.PID}
		} else {
			u := t.MetricsURL
			if u == "" {
				var err error
				if u, err = metricsURL(t.URL); err != nil {
					return nil, err
				}
			}
			p = metricsProbe{url: u, client: client}
		}
		s.probes = append(s.probes, p)
		s.stats = append(s.stats, NodeStats{Name: t.Name, URL: t.URL, Source: p.source()})
	}
	self := procProbe{pid: os.Getpid()}
	s.probes = append(s.probes, self)
	s.stats = append(s.stats, NodeStats{Name: "meshbench", Source: self.source()})
	s.nodes = len(targets)
	if postgresPID > 0 {
		pg := treeProbe{pid: postgresPID}
		s.probes = append(s.probes, pg)
		s.stats = append(s.stats, NodeStats{Name: "postgres", Source: pg.source()})
	}
	return s, nil
}

// ourPIDs are the processes of the benchmark on this machine: nodes
// sampled through /proc, this process, and Postgres (whose backends are
// recognised by their parent).
func (s *sampler) ourPIDs() map[int]bool {
	ours := map[int]bool{}
	for _, p := range s.probes {
		switch p := p.(type) {
		case procProbe:
			ours[p.pid] = true
		case treeProbe:
			ours[p.pid] = true
		}
	}
	return ours
}

// start samples every interval until stop.
func (s *sampler) start(interval time.Duration) {
	s.host = newHostTracker(s.ourPIDs())
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			s.sampleAll(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

func (s *sampler) sampleAll(ctx context.Context) {
	var wg sync.WaitGroup
	if s.host != nil {
		wg.Go(s.host.scan)
	}
	for i := range s.probes {
		wg.Go(func() { _, _ = s.sample(ctx, i) })
	}
	wg.Wait()
}

// sample reads probe i once and folds the reading into its stats.
func (s *sampler) sample(ctx context.Context, i int) (usage, error) {
	u, err := s.probes[i].read(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &s.stats[i]
	if err != nil {
		if ctx.Err() == nil {
			st.Errors++
			st.LastError = err.Error()
		}
		return u, err
	}
	if st.Samples == 0 {
		st.StartRSSBytes, st.StartFDs, st.firstCPU = u.rss, u.fds, u.cpu
	}
	st.CPUSeconds = u.cpu - st.firstCPU
	st.Samples++
	st.PeakRSSBytes = max(st.PeakRSSBytes, u.rss)
	st.PeakFDs = max(st.PeakFDs, u.fds)
	st.EndRSSBytes, st.EndFDs = u.rss, u.fds
	return u, nil
}

// stop takes a last reading of every probe and returns the nodes' stats,
// the generator's, Postgres's (nil when not sampled) and the machine's.
func (s *sampler) stop() (nodes []NodeStats, self NodeStats, pg *NodeStats, host HostStats) {
	s.cancel()
	<-s.done
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	s.sampleAll(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.host != nil {
		host = s.host.stats()
	}
	nodes = append([]NodeStats(nil), s.stats[:s.nodes]...)
	self = s.stats[s.nodes]
	if len(s.stats) > s.nodes+1 {
		p := s.stats[s.nodes+1]
		pg = &p
	}
	return nodes, self, pg, host
}
