package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/claudemesh/broker/internal/pgembed"
	"github.com/claudemesh/broker/internal/store"
)

// SpawnOptions configure a private cluster for a run.
type SpawnOptions struct {
	Nodes int // broker processes; default 3
	// BrokerBin is the broker binary; empty builds
	// github.com/claudemesh/broker/cmd/broker with `go build` (the current
	// directory must be inside the module).
	BrokerBin string
	// PGFast turns fsync and synchronous_commit off. Faster, but not how a
	// broker runs in production: keep it off for published numbers.
	PGFast bool
	// PGStatements loads pg_stat_statements into the private Postgres, for
	// Options.PGStatements.
	PGStatements bool
	// BasePort is the first node's HTTP port; the others follow, then the
	// gossip ports. Zero picks a free range.
	BasePort int
	// Env holds extra KEY=VALUE settings for every node; they override the
	// load-test defaults (see Spawn).
	Env    []string
	GitSHA string // reported by the nodes' /health as gitSha
	// KeepDir leaves the temporary folder (Postgres data, node logs).
	KeepDir bool
	Logger  *slog.Logger
}

// Cluster is a private Postgres and broker processes on 127.0.0.1.
type Cluster struct {
	DatabaseURL string
	Targets     []Target
	Postgres    string // the server's version line
	PostgresPID int    // the postmaster
	Dir         string // Postgres data and node logs

	pg      *pgembed.Server
	procs   []*brokerProc
	keepDir bool
	logger  *slog.Logger
}

type brokerProc struct {
	name   string
	port   int
	cmd    *exec.Cmd
	log    string
	exited chan struct{} // closed once the process has been waited for
	err    error         // exit status, valid once exited is closed
}

// Spawn starts a private Postgres (data in a temporary folder, as the
// postgres user when running as root) and opts.Nodes `broker serve`
// processes on consecutive 127.0.0.1 ports, gossiping with the first, and
// waits until every node's /health reports the full cluster. Each node
// gets the load-test settings MAX_CONNECTIONS_PER_MESH=100000,
// HELLO_RATE_PER_SEC=100000, SEND_RATE_PER_SEC=100000 and LOG_LEVEL=warn,
// which opts.Env can override. Close stops everything.
func Spawn(ctx context.Context, opts SpawnOptions) (c *Cluster, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.Nodes < 1 || opts.Nodes > 64 {
		return nil, fmt.Errorf("spawn: %d nodes is outside 1..64", opts.Nodes)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	dir, err := os.MkdirTemp("", "meshbench-")
	if err != nil {
		return nil, err
	}
	// Postgres may run as the postgres user, which must reach its folder.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	c = &Cluster{Dir: dir, keepDir: opts.KeepDir, logger: opts.Logger}
	// The cleanup holds its own reference: "return nil, err" has already
	// set c to nil when it runs (it used to panic on a nil Cluster and
	// leave Postgres running).
	started := c
	defer func() {
		if err != nil {
			_ = started.Close()
			c = nil
		}
	}()

	bin := opts.BrokerBin
	if bin == "" {
		bin = filepath.Join(dir, "broker")
		opts.Logger.Info("building the broker", "out", bin)
		out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/claudemesh/broker/cmd/broker").CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("spawn: go build cmd/broker (run inside the module, or pass a broker binary): %w\n%s", err, out)
		}
	}

	pgBin, err := pgembed.FindBinaries()
	if err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, filepath.Join(pgBin, "postgres"), "--version").Output(); err == nil {
		c.Postgres = strings.TrimSpace(string(out))
	}
	pgo := pgembed.Options{DataDir: filepath.Join(dir, "pg"), Fast: opts.PGFast, BinDir: pgBin, Logger: opts.Logger}
	if opts.PGStatements {
		pgo.Settings = []string{"shared_preload_libraries=pg_stat_statements"}
	}
	c.pg, err = pgembed.Start(ctx, pgo)
	if err != nil {
		return nil, fmt.Errorf("spawn: postgres: %w", err)
	}
	c.DatabaseURL = c.pg.URL("postgres")
	c.PostgresPID = postmasterPID(c.pg.DataDir())
	if _, err := store.Migrate(ctx, c.DatabaseURL); err != nil {
		return nil, fmt.Errorf("spawn: migrate: %w", err)
	}

	base := opts.BasePort
	if base == 0 {
		if base, err = freePortRange(2 * opts.Nodes); err != nil {
			return nil, err
		}
	}
	gossip := func(i int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(base+opts.Nodes+i)) }
	for i := range opts.Nodes {
		p := &brokerProc{name: fmt.Sprintf("bench-%d", i+1), port: base + i, exited: make(chan struct{})}
		p.log = filepath.Join(dir, p.name+".log")
		env := append(os.Environ(),
			"DATABASE_URL="+c.DatabaseURL,
			"BROKER_HOST=127.0.0.1",
			"BROKER_PORT="+strconv.Itoa(p.port),
			"NODE_NAME="+p.name,
			"CLUSTER_BIND="+gossip(i),
			"CLUSTER_PROFILE=local",
			"LOG_LEVEL=warn",
			"MAX_CONNECTIONS_PER_MESH=100000",
			"HELLO_RATE_PER_SEC=100000",
			"SEND_RATE_PER_SEC=100000",
			"GIT_SHA="+opts.GitSHA,
		)
		if i > 0 {
			env = append(env, "CLUSTER_JOIN="+gossip(0))
		}
		env = append(env, opts.Env...) // later entries win
		if err := p.start(bin, env); err != nil {
			return nil, err
		}
		c.procs = append(c.procs, p)
		c.Targets = append(c.Targets, Target{Name: p.name, URL: fmt.Sprintf("ws://127.0.0.1:%d/ws", p.port), PID: p.cmd.Process.Pid})
	}
	if err := c.waitHealthy(ctx, 60*time.Second); err != nil {
		return nil, err
	}
	return c, nil
}

func (p *brokerProc) start(bin string, env []string) error {
	logf, err := os.Create(p.log)
	if err != nil {
		return err
	}
	p.cmd = exec.Command(bin, "serve")
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	// Own process group: a Ctrl-C at the terminal reaches meshbench only,
	// which then stops the nodes in order. Pdeathsig: a node never
	// outlives a meshbench that was killed outright.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("spawn %s: %w", p.name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	return nil
}

// health is the part of /health the cluster check reads.
type health struct {
	Status      string `json:"status"`
	ClusterSize int    `json:"clusterSize"`
}

// waitHealthy polls every node's /health until it reports the full
// cluster, or a node exits, or the timeout passes.
func (c *Cluster) waitHealthy(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for _, p := range c.procs {
		for {
			h, err := getHealth(ctx, hc, fmt.Sprintf("http://127.0.0.1:%d/health", p.port))
			if err == nil && h.Status == "ok" && h.ClusterSize == len(c.procs) {
				break
			}
			retry := time.NewTimer(100 * time.Millisecond)
			select {
			case <-p.exited:
				retry.Stop()
				return fmt.Errorf("spawn: %s exited: %v\n%s", p.name, p.err, tail(p.log, 20))
			case <-ctx.Done():
				retry.Stop()
				return fmt.Errorf("spawn: %s not ready (health %+v, %v): %w\n%s", p.name, h, err, ctx.Err(), tail(p.log, 20))
			case <-retry.C:
			}
		}
	}
	return nil
}

func getHealth(ctx context.Context, hc *http.Client, url string) (health, error) {
	var h health
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return h, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&h)
	return h, err
}

// Close stops the nodes (SIGTERM, then SIGKILL after 15 s), then
// Postgres, and removes the temporary folder. It reports nodes that had
// exited on their own, with the end of their logs.
func (c *Cluster) Close() error {
	var errs []error
	for _, p := range c.procs {
		select {
		case <-p.exited:
			errs = append(errs, fmt.Errorf("%s had exited during the run: %v\n%s", p.name, p.err, tail(p.log, 20)))
			continue
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range c.procs {
		t := time.NewTimer(15 * time.Second)
		select {
		case <-p.exited:
		case <-t.C:
			_ = p.cmd.Process.Kill()
			<-p.exited
			errs = append(errs, fmt.Errorf("%s did not stop within 15 s of SIGTERM; killed", p.name))
		}
		t.Stop()
	}
	if c.pg != nil {
		if err := c.pg.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.keepDir {
		c.logger.Info("kept the cluster folder", "dir", c.Dir)
	} else if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// freePortRange finds n consecutive free TCP and UDP ports on 127.0.0.1
// (HTTP ports, then gossip ports, which memberlist uses over both).
func freePortRange(n int) (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		base := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if base+n > 65535 {
			continue
		}
		if portsFree(base, n) {
			return base, nil
		}
	}
	return 0, errors.New("spawn: no range of free ports found; pass a base port")
}

func portsFree(base, n int) bool {
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	for p := base; p < base+n; p++ {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		closers = append(closers, l)
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		closers = append(closers, u)
	}
	return true
}

// postmasterPID reads the first line of the data folder's
// postmaster.pid; 0 when it cannot.
func postmasterPID(dataDir string) int {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		return 0
	}
	return pid
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
