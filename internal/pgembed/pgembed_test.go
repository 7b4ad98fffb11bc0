package pgembed_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/pgembed"
)

// dataDir is a data folder the postgres user can reach when the tests run
// as root.
func dataDir(t *testing.T) string {
	t.Helper()
	base := t.TempDir()
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(base, "pg")
}

// notices collects the one-line explanations a server gives its user.
type notices struct {
	mu    sync.Mutex
	lines []string
}

func (n *notices) add(s string) { n.mu.Lock(); n.lines = append(n.lines, s); n.mu.Unlock() }

func (n *notices) take() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	l := n.lines
	n.lines = nil
	return l
}

func start(t *testing.T, dir string, n *notices, port int, fallback bool) (*pgembed.Server, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := pgembed.Start(ctx, pgembed.Options{DataDir: dir, Fast: true, Port: port, PortFallback: fallback, Notify: n.add})
	if err == nil {
		t.Cleanup(func() { _ = s.Stop() })
	}
	return s, err
}

func mustStart(t *testing.T, dir string, n *notices) *pgembed.Server {
	t.Helper()
	s, err := start(t, dir, n, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	ping(t, s)
	return s
}

func ping(t *testing.T, s *pgembed.Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		t.Fatalf("connect to the server on port %d: %v", s.Port(), err)
	}
	conn.Close(ctx)
}

// serverCredential is the user the server runs as (nil: this process's).
func serverCredential(t *testing.T) *syscall.Credential {
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
}

func writePIDFile(t *testing.T, dir string, pid int) {
	t.Helper()
	// The layout Postgres writes: PID, data folder, start time, port, ...
	body := fmt.Sprintf("%d\n%s\n%d\n%d\n\n127.0.0.1\n  1234567     42\nready   \n", pid, dir, time.Now().Unix(), 5432)
	path := filepath.Join(dir, "postmaster.pid")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if c := serverCredential(t); c != nil {
		if err := os.Chown(path, int(c.Uid), int(c.Gid)); err != nil {
			t.Fatal(err)
		}
	}
}

func expectNotice(t *testing.T, n *notices, want ...string) {
	t.Helper()
	got := n.take()
	if len(got) != 1 {
		t.Fatalf("notices %q, want one line mentioning %q", got, want)
	}
	for _, w := range want {
		if !strings.Contains(got[0], w) || strings.Contains(got[0], "\n") {
			t.Fatalf("notice %q, want one line mentioning %q", got[0], w)
		}
	}
}

// A postmaster.pid left by a server that died with its broker (kill -9, a
// crash, a container restart) is recovered with one line: whether its PID
// is dead or now belongs to another program of the same user (which on its
// own makes Postgres refuse to start).
func TestStalePIDFileRecovered(t *testing.T) {
	dir := dataDir(t)
	var n notices
	s := mustStart(t, dir, &n)
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if got := n.take(); len(got) != 0 {
		t.Fatalf("a clean start explained %q", got)
	}

	// A dead PID.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	writePIDFile(t, dir, dead.Process.Pid)
	s = mustStart(t, dir, &n)
	expectNotice(t, &n, "removed a stale postmaster.pid", strconv.Itoa(dead.Process.Pid), "is not running")
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}

	// A PID reused by a live program running as the server's user.
	other := exec.Command("sleep", "60")
	if c := serverCredential(t); c != nil {
		other.SysProcAttr = &syscall.SysProcAttr{Credential: c}
	}
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
	writePIDFile(t, dir, other.Process.Pid)
	mustStart(t, dir, &n)
	expectNotice(t, &n, "removed a stale postmaster.pid", "now belongs to another program")
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the unrelated program was signalled: %v", err)
	}
}

// A server an earlier run left running (its broker lost its terminal) is
// stopped, with one line, and a new one starts in the folder, also on
// another port.
func TestLeftRunningServerStopped(t *testing.T) {
	dir := dataDir(t)
	var n notices
	old := mustStart(t, dir, &n)
	pf, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	oldPID, _ := strconv.Atoi(strings.SplitN(string(pf), "\n", 2)[0])

	s := mustStart(t, dir, &n)
	expectNotice(t, &n, "left running by an earlier run", strconv.Itoa(oldPID), strconv.Itoa(old.Port()), "stopping it")
	if s.Port() != old.Port() {
		if c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(old.Port())), time.Second); err == nil {
			c.Close()
			t.Fatalf("the old server still listens on %d", old.Port())
		}
	}
	if alive(oldPID) {
		t.Fatalf("the old postmaster (PID %d) is still alive", oldPID)
	}
}

// alive reports whether pid runs; a zombie (an exited server whose parent,
// pg_ctl, left it to an init that does not reap) does not.
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) state ...: comm may hold spaces, the state follows the last ')'.
	rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
	return !strings.HasPrefix(strings.TrimSpace(rest), "Z")
}

// The preferred port is used when free; when another program holds it the
// server either fails with a clear error or, when allowed, takes another
// port and says so.
func TestPortFallback(t *testing.T) {
	dir := dataDir(t)
	var n notices
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	taken := ln.Addr().(*net.TCPAddr).Port
	if _, err := start(t, dir, &n, taken, false); err == nil || !strings.Contains(err.Error(), "port "+strconv.Itoa(taken)+" on 127.0.0.1 is taken") {
		t.Fatalf("start on a taken port: %v", err)
	}
	s, err := start(t, dir, &n, taken, true)
	if err != nil {
		t.Fatal(err)
	}
	ping(t, s)
	if s.Port() == taken {
		t.Fatal("the server claims the taken port")
	}
	expectNotice(t, &n, "port "+strconv.Itoa(taken)+" is taken", "using "+strconv.Itoa(s.Port()))
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	free := s.Port()
	s, err = start(t, dir, &n, free, true)
	if err != nil || s.Port() != free {
		t.Fatalf("start on the free port %d: port %v, %v", free, s, err)
	}
	if got := n.take(); len(got) != 0 {
		t.Fatalf("notices on a free port: %q", got)
	}
}

// A server that cannot start says why in one line and points to its log,
// instead of pasting the log.
func TestStartFailureIsOneLine(t *testing.T) {
	dir := dataDir(t)
	var n notices
	s := mustStart(t, dir, &n)
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "postgresql.conf")
	f, err := os.OpenFile(conf, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, "shared_buffers = 'a lot'")
	f.Close()
	_, err = start(t, dir, &n, 0, false)
	if err == nil {
		t.Fatal("a server with a broken configuration started")
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") || strings.Contains(msg, " | ") || !strings.Contains(msg, "shared_buffers") ||
		!strings.Contains(msg, "full log: "+filepath.Join(dir, "server.log")) {
		t.Fatalf("start error %q: want one line naming the bad setting and the log", msg)
	}
}
