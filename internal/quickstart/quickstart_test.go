package quickstart_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/claudemesh/broker/internal/claudecode"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// root is the repository's top folder.
var root = func() string {
	abs, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		panic(err)
	}
	return abs
}()

// scriptTimeout bounds one run of the script: builds, a broker dev start
// and about twenty CLI commands take some 15 s on an idle machine.
const scriptTimeout = 5 * time.Minute

// syncBuffer collects the script's output while it runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// freePortRange returns the first of n consecutive ports free on 127.0.0.1
// for TCP and UDP (gossip uses both), below the kernel's ephemeral range so
// that ":0" listeners of tests running meanwhile cannot take them. The
// script tries other ports if one is taken by the time broker dev binds.
func freePortRange(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 200; try++ {
		base := 20000 + rand.IntN(11000-n)
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

// workDir is a scratch folder the postgres user can enter (broker dev runs
// Postgres as that user when the tests run as root).
func workDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "work")
}

// result is one run of the script.
type result struct {
	work   string
	output string
	err    error
}

// runScript runs scripts/two-sessions.sh on readme (the README's text) and
// checks that it left nothing running, whatever its outcome.
func runScript(t *testing.T, readme string, wait time.Duration) result {
	t.Helper()
	work := workDir(t)
	readmePath := filepath.Join(filepath.Dir(work), "README.md")
	if err := os.WriteFile(readmePath, []byte(readme), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "scripts", "two-sessions.sh"))
	cmd.Dir = root
	cmd.Env = append(os.Environ(),
		"TWO_SESSIONS_WORK="+work,
		"TWO_SESSIONS_PORT="+strconv.Itoa(freePortRange(t, 9)),
		"TWO_SESSIONS_README="+readmePath,
		"TWO_SESSIONS_WAIT="+strconv.Itoa(int(wait.Seconds())),
	)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// Its own process group: a run cut short by the deadline is stopped
	// whole, the script first (SIGTERM: it stops broker dev cleanly).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 90 * time.Second
	err := cmd.Run()
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // anything left in the group
	}
	if ctx.Err() != nil {
		t.Errorf("the script did not finish within %s", scriptTimeout)
	}
	r := result{work: work, output: out.String(), err: err}
	checkNothingLeft(t, r)
	return r
}

// checkNothingLeft fails when a process the script started (they all
// carry TWO_SESSIONS_RUN=<work>) or broker dev's Postgres still runs.
func checkNothingLeft(t *testing.T, r result) {
	t.Helper()
	mark := []byte("TWO_SESSIONS_RUN=" + r.work + "\x00")
	var left []string
	deadline := time.Now().Add(15 * time.Second)
	for {
		left = left[:0]
		dirs, _ := filepath.Glob("/proc/[0-9]*")
		for _, d := range dirs {
			env, err := os.ReadFile(filepath.Join(d, "environ"))
			if err != nil || !bytes.Contains(env, mark) {
				continue
			}
			if stat, err := os.ReadFile(filepath.Join(d, "stat")); err == nil {
				if rest := stat[bytes.LastIndexByte(stat, ')')+1:]; strings.HasPrefix(strings.TrimSpace(string(rest)), "Z") {
					continue // exited, not yet reaped
				}
			}
			cmdline, _ := os.ReadFile(filepath.Join(d, "cmdline"))
			left = append(left, filepath.Base(d)+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(left) > 0 {
		for _, l := range left {
			if pid, err := strconv.Atoi(strings.SplitN(l, ":", 2)[0]); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		t.Errorf("processes the script started still run after it exited:\n%s\nscript output:\n%s", strings.Join(left, "\n"), r.output)
	}
	pidFile := filepath.Join(r.work, "data", "pg", "postmaster.pid")
	if b, err := os.ReadFile(pidFile); err == nil {
		pid, _ := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
		if cwd, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/cwd"); cwd == filepath.Dir(pidFile) {
			_ = syscall.Kill(pid, syscall.SIGINT)
			t.Errorf("broker dev's Postgres (PID %d) still runs after the script exited", pid)
		}
	}
}

func readme(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// steps are the command lines of the README's steps block (what the
// script runs), without their comments.
func steps(t *testing.T, text string) []string {
	t.Helper()
	_, after, ok := strings.Cut(text, "\n<!-- two-sessions:steps")
	if !ok {
		t.Fatal("README.md has no <!-- two-sessions:steps marker")
	}
	_, after, ok = strings.Cut(after, "\n```sh\n")
	if !ok {
		t.Fatal("no ```sh block after the steps marker")
	}
	block, _, ok := strings.Cut(after, "\n```\n")
	if !ok {
		t.Fatal("the steps block does not end")
	}
	var out []string
	for _, line := range strings.Split(block, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cmd, _, _ := strings.Cut(line, "  # ")
		out = append(out, strings.TrimRight(cmd, " "))
	}
	return out
}

// The README's section, run as written: every line of it runs, in order,
// prints what its comment says, and leaves two HOMEs whose Claude Code
// settings run the installed claudemesh for the six hook events and as the
// MCP server. Nothing keeps running afterwards.
func TestTwoSessions(t *testing.T) {
	text := readme(t)
	r := runScript(t, text, 30*time.Second)
	if r.err != nil || !strings.Contains(r.output, "two-sessions: PASS") {
		t.Fatalf("scripts/two-sessions.sh: %v\n%s", r.err, r.output)
	}
	// Every step ran, in order (the script announces each one).
	pos := 0
	for _, s := range steps(t, text) {
		i := strings.Index(r.output[pos:], ": $ "+s+"\n")
		if i < 0 {
			t.Fatalf("the script did not run the README's step %q (in order):\n%s", s, r.output)
		}
		pos += i
	}
	bin := filepath.Join(r.work, "gopath", "bin", "claudemesh")
	for _, who := range []string{"alice", "bob"} {
		home := filepath.Join(r.work, who)
		var settings struct {
			Hooks map[string][]struct {
				Hooks []struct{ Type, Command string }
			}
		}
		readJSON(t, filepath.Join(home, ".claude", "settings.json"), &settings)
		for _, ev := range claudecode.InstalledEvents {
			found := false
			for _, g := range settings.Hooks[ev] {
				for _, h := range g.Hooks {
					found = found || h.Type == "command" && h.Command == bin+" hook"
				}
			}
			if !found {
				t.Errorf("%s: no %s hook runs %q: %+v", who, ev, bin+" hook", settings.Hooks[ev])
			}
		}
		var claude struct {
			MCPServers map[string]claudecode.MCPServer `json:"mcpServers"`
		}
		readJSON(t, filepath.Join(home, ".claude.json"), &claude)
		if s := claude.MCPServers["claudemesh"]; s.Command != bin || strings.Join(s.Args, " ") != "mcp" || s.Type != "stdio" {
			t.Errorf("%s: MCP server %+v, want stdio %s mcp", who, s, bin)
		}
	}
	// bob's listen printed exactly its three messages, the held one last.
	log, err := os.ReadFile(filepath.Join(r.work, "logs", "listen.log"))
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, line := range strings.Split(string(log), "\n") {
		if strings.HasPrefix(line, "    ") {
			got = append(got, strings.TrimSpace(line))
		}
	}
	if strings.Join(got, "|") != "are you there?|main is red|lunch later?" {
		t.Errorf("bob's listen printed %q, want the three messages with the held one last:\n%s", got, log)
	}
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// The script fails, saying which step, when a step breaks: a message that
// never reaches bob, a held message that arrives before its turn, an
// install that registers no hooks (its comment dropped too, so that the
// script's own check of the settings must catch it), a join line that is
// not the banner's. Each case is the README with one change.
func TestTwoSessionsFailsWhenAStepBreaks(t *testing.T) {
	text := readme(t)
	type edit struct{ from, to string }
	cases := []struct {
		name  string
		edits []edit
		want  string
	}{
		{
			name: "message never sent",
			edits: []edit{{`HOME=/tmp/alice claudemesh send bob "are you there?"`,
				`HOME=/tmp/alice claudemesh outbox                 `}},
			want: "the background claudemesh listen did not print, in order within 10s: «are you there?»",
		},
		{
			// listen waits for a fourth message, so that it is still there
			// when bob turns idle again.
			name: "held message delivered at once",
			edits: []edit{
				{"HOME=/tmp/bob claudemesh listen --count 3 &", "HOME=/tmp/bob claudemesh listen --count 4 &"},
				{"HOME=/tmp/bob claudemesh status working                     # → status working: listen session\n",
					"HOME=/tmp/bob claudemesh status idle\n"},
				{"HOME=/tmp/alice claudemesh peers                            # → working (manual)\n",
					"HOME=/tmp/alice claudemesh peers\n"},
			},
			want: "the background claudemesh listen did not print, in order within 10s: «lunch later?»",
		},
		{
			name: "install registers no hooks",
			edits: []edit{{"HOME=/tmp/alice claudemesh install                          # → hooks.PostToolUse: added → mcpServers.claudemesh: registered\n",
				"HOME=/tmp/alice claudemesh install --no-hooks\n"}},
			want: "install wrote no ",
		},
		{
			name:  "join line not the banner's",
			edits: []edit{{"HOME=/tmp/bob claudemesh join cm1.… --name bob ", "HOME=/tmp/bob claudemesh join cm1.… --name bobby "}},
			want:  "--name bobby` is not one of the banner's join lines",
		},
	}
	for _, c := range cases {
		for _, e := range c.edits {
			if strings.Count(text, e.from) != 1 {
				t.Fatalf("%s: the README no longer has %q once; update this case", c.name, e.from)
			}
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			broken := text
			for _, e := range c.edits {
				broken = strings.Replace(broken, e.from, e.to, 1)
			}
			r := runScript(t, broken, 10*time.Second)
			var exit *exec.ExitError
			if !errors.As(r.err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("the script with a broken step: %v, want exit status 1:\n%s", r.err, r.output)
			}
			if !strings.Contains(r.output, "two-sessions: FAIL: ") || !strings.Contains(r.output, c.want) {
				t.Fatalf("the script failed without saying %q:\n%s", c.want, r.output)
			}
		})
	}
}
