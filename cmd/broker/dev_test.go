package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cmcli "github.com/claudemesh/broker/internal/cli"
	"github.com/claudemesh/broker/internal/testkit"
)

// The tests below run this test binary as the broker: with envMain set,
// TestMain hands over to main(), so `broker dev` and the `broker serve`
// processes it starts are the real command.
const envMain = "BROKER_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(envMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// devProcess is a `broker dev` running as a child of the test.
type devProcess struct {
	t    *testing.T
	cmd  *exec.Cmd
	data string

	mu   sync.Mutex
	out  bytes.Buffer // stdout so far
	grew chan struct{}
	done chan struct{} // closed once the process has exited
	err  error
}

func startDev(t *testing.T, data string, args ...string) *devProcess {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args = append([]string{"dev", "--data", data}, args...)
	d := &devProcess{t: t, data: data, grew: make(chan struct{}, 1), done: make(chan struct{})}
	d.cmd = exec.Command(exe, args...)
	d.cmd.Env = append(os.Environ(), envMain+"=1", "LOG_LEVEL=warn", "SHUTDOWN_TIMEOUT=5s")
	d.cmd.Stderr = testWriter{t}
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			d.mu.Lock()
			d.out.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			select {
			case d.grew <- struct{}{}:
			default:
			}
		}
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(30 * time.Second):
				_ = d.cmd.Process.Kill()
				<-d.done
			}
		}
	})
	return d
}

// testWriter sends a child's log to the test log, shown when a test fails.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

func (d *devProcess) stdout() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.out.String()
}

// waitFor waits until stdout contains want, and fails when the process
// exits or the deadline passes first.
func (d *devProcess) waitFor(want string, timeout time.Duration) string {
	d.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		if out := d.stdout(); strings.Contains(out, want) {
			return out
		}
		select {
		case <-d.grew:
		case <-d.done:
			if out := d.stdout(); strings.Contains(out, want) {
				return out
			}
			d.t.Fatalf("broker dev exited (%v) before printing %q:\n%s", d.err, want, d.stdout())
		case <-deadline.C:
			d.t.Fatalf("broker dev did not print %q within %s:\n%s", want, timeout, d.stdout())
		}
	}
}

// exit waits for the process to end and returns its error (nil: status 0).
func (d *devProcess) exit(timeout time.Duration) error {
	d.t.Helper()
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		// SIGQUIT makes the Go runtime write every goroutine's stack to
		// stderr (the test log) and exit: where the shutdown stuck.
		_ = d.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
		}
		d.t.Fatalf("broker dev did not exit within %s (goroutine dump above):\n%s", timeout, d.stdout())
	}
	return nil
}

const bannerEnd = "Ctrl-C stops the cluster"

// freePortRange returns the first of n consecutive ports free on 127.0.0.1
// for TCP and UDP, below the kernel's ephemeral range so that ":0"
// listeners of tests running meanwhile cannot take them.
func freePortRange(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 200; try++ {
		base := 20000 + rand.IntN(12000-n)
		ok := true
		var closers []io.Closer
		for p := base; p < base+n && ok; p++ {
			addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				ok = false
				break
			}
			closers = append(closers, ln)
			pc, err := net.ListenPacket("udp", addr)
			if err != nil {
				ok = false
				break
			}
			closers = append(closers, pc)
		}
		for _, c := range closers {
			c.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return 0
}

func dataDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	// Postgres may run as the postgres user, who must reach the folder.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data := filepath.Join(dir, "data")
	// A failed test may leave its Postgres behind: stop it (fast shutdown),
	// if the PID in its postmaster.pid still is this folder's server.
	t.Cleanup(func() {
		pgDir := filepath.Join(data, "pg")
		b, err := os.ReadFile(filepath.Join(pgDir, "postmaster.pid"))
		if err != nil {
			return
		}
		pid, _ := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
		if cwd, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/cwd"); err == nil && cwd == pgDir {
			_ = syscall.Kill(pid, syscall.SIGINT)
			waitGone(t, "the test's Postgres", pid, 30*time.Second)
		}
	})
	return data
}

// alive reports whether pid runs; a zombie does not.
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	rest := string(stat[bytes.LastIndexByte(stat, ')')+1:])
	return !strings.HasPrefix(strings.TrimSpace(rest), "Z")
}

// waitGone waits for a process that is not the test's child to end (no
// exit notification exists for those).
func waitGone(t *testing.T, what string, pid int, timeout time.Duration) {
	t.Helper()
	testkit.Eventually(t, timeout, what+" (PID "+strconv.Itoa(pid)+") to end", func() bool { return !alive(pid) })
}

func postmasterPID(t *testing.T, data string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(data, "pg", "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func pgPort(t *testing.T, banner string) int {
	t.Helper()
	m := regexp.MustCompile(`Postgres: postgres://postgres@127\.0\.0\.1:(\d+)/`).FindStringSubmatch(banner)
	if m == nil {
		t.Fatalf("no Postgres line in the banner:\n%s", banner)
	}
	p, _ := strconv.Atoi(m[1])
	return p
}

func refused(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return true
}

// The terminal of a `broker dev` closes (SIGHUP): the cluster stops
// cleanly, Postgres included. Before, SIGHUP's default action ended the
// process and left Postgres running. And when a broker dev is killed
// outright, leaving its Postgres, the next start stops that server with one
// line and starts.
func TestDevStopsOnSIGHUPAndRecoversLeftoverPostgres(t *testing.T) {
	// Started under nohup, this test binary has SIGHUP ignored, and the
	// broker dev it starts inherits that and keeps ignoring it, as it must
	// (stopSignals): it would never stop. Catching SIGHUP here gives the
	// children the default disposition a process started from a terminal
	// has (a caught signal is reset on exec, an ignored one is not).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	data := dataDir(t)
	ports := freePortRange(t, 2)
	args := []string{"--nodes", "1", "--lb-port", "0", "--port", strconv.Itoa(ports), "--gossip-port", strconv.Itoa(ports + 1)}

	// Killed outright: Postgres stays behind.
	d := startDev(t, data, args...)
	banner := d.waitFor(bannerEnd, 2*time.Minute)
	port := pgPort(t, banner)
	left := postmasterPID(t, data)
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = d.exit(30 * time.Second)
	if !alive(left) || refused(port) {
		t.Fatalf("the killed broker dev's Postgres (PID %d) is not running: nothing to recover", left)
	}

	d = startDev(t, data, args...)
	banner = d.waitFor(bannerEnd, 2*time.Minute)
	want := "postgres: a server left running by an earlier run (PID " + strconv.Itoa(left) + ", port " + strconv.Itoa(port) + ")"
	if !strings.Contains(banner, want) || strings.Count(banner, "postgres: ") != 1 {
		t.Fatalf("the leftover server was not explained in one line %q:\n%s", want, banner)
	}
	waitGone(t, "the leftover postmaster", left, 10*time.Second)
	if p := pgPort(t, banner); p != port {
		t.Fatalf("Postgres moved from port %d to %d", port, p)
	}
	pg := postmasterPID(t, data)

	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := d.exit(60 * time.Second); err != nil {
		t.Fatalf("broker dev after SIGHUP: %v, want exit status 0", err)
	}
	waitGone(t, "Postgres after SIGHUP", pg, 10*time.Second)
	if _, err := os.Stat(filepath.Join(data, "pg", "postmaster.pid")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("postmaster.pid after SIGHUP: %v", err)
	}
	if !refused(port) {
		t.Fatalf("Postgres still listens on %d after SIGHUP", port)
	}
}

type health struct {
	Node        string `json:"node"`
	ClusterSize int    `json:"clusterSize"`
}

func getHealth(url string) (health, error) {
	c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url + "/health")
	if err != nil {
		return health{}, err
	}
	defer resp.Body.Close()
	var h health
	if resp.StatusCode != http.StatusOK {
		return h, errors.New(resp.Status)
	}
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

// `broker dev --processes`: every node is its own process with its PID in
// the banner. One is killed (kill -9): the dev cluster says so, the load
// balancer keeps answering from the others, and the banner's join line
// still works through it. Ctrl-C then stops every node process and
// Postgres.
func TestDevProcessesFailover(t *testing.T) {
	data := dataDir(t)
	ports := freePortRange(t, 7) // 3 HTTP, 3 gossip, 1 LB
	lb := "http://127.0.0.1:" + strconv.Itoa(ports+6)
	d := startDev(t, data, "--processes", "--nodes", "3", "--port", strconv.Itoa(ports),
		"--gossip-port", strconv.Itoa(ports+3), "--lb-port", strconv.Itoa(ports+6))
	banner := d.waitFor(bannerEnd, 2*time.Minute)

	pids := map[string]int{}
	for _, m := range regexp.MustCompile(`(?m)^  (dev-\d)\s+ws://\S+\s+PID (\d+)`).FindAllStringSubmatch(banner, -1) {
		pids[m[1]], _ = strconv.Atoi(m[2])
	}
	if len(pids) != 3 {
		t.Fatalf("want 3 node PIDs in the banner:\n%s", banner)
	}
	for name, pid := range pids {
		if pid == d.cmd.Process.Pid || !alive(pid) {
			t.Fatalf("%s: PID %d is not a live process of its own", name, pid)
		}
	}
	testkit.Eventually(t, 30*time.Second, "the node processes to form a cluster of 3", func() bool {
		h, err := getHealth(lb)
		return err == nil && h.ClusterSize == 3
	})

	victim := "dev-2"
	if err := syscall.Kill(pids[victim], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitFor(victim+" (PID "+strconv.Itoa(pids[victim])+") exited: signal: killed", 30*time.Second)
	// The killed node never answers again; the balancer answers every
	// request from the others (a failed dial is retried on the next node).
	for i := 0; i < 12; i++ {
		h, err := getHealth(lb)
		if err != nil || h.Node == victim || h.Node == "" {
			t.Fatalf("request %d through the balancer after killing %s: %+v %v", i, victim, h, err)
		}
	}
	m := regexp.MustCompile(`(?m)^  (claudemesh join \S+ --name alice)$`).FindStringSubmatch(banner)
	if m == nil {
		t.Fatalf("no join line:\n%s", banner)
	}
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	home := t.TempDir()
	code := cmcli.Run(ctx, strings.Fields(m[1])[1:], cmcli.Env{Stdin: strings.NewReader(""), Stdout: &out, Stderr: &errb,
		Getenv: func(string) string { return "" }, Home: home, Cwd: home, Hostname: "h", Executable: "/usr/local/bin/claudemesh",
		SessionPID: func() (int, bool) { return 0, false }})
	if code != 0 || !strings.Contains(out.String(), `as alice (`) {
		t.Fatalf("join through the balancer with a node killed: %d %s %s", code, out.String(), errb.String())
	}

	pg := postmasterPID(t, data)
	if err := d.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := d.exit(60 * time.Second); err != nil {
		t.Fatalf("broker dev after Ctrl-C: %v", err)
	}
	for name, pid := range pids {
		waitGone(t, name, pid, 10*time.Second)
	}
	waitGone(t, "Postgres", pg, 10*time.Second)
	if strings.Contains(d.stdout(), "dev-1 (PID") || strings.Contains(d.stdout(), "dev-3 (PID") {
		t.Fatalf("a node stopped by Ctrl-C was reported as exited:\n%s", d.stdout())
	}
}
