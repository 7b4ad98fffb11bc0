package deploycheck_test

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) {
	code := pgtest.Main(m)
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// root is the repository root, where the deployment files live.
var root = func() string {
	abs, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		panic(err)
	}
	return abs
}()

func repoPath(rel string) string { return filepath.Join(root, filepath.FromSlash(rel)) }

func readRepoFile(t *testing.T, rel string) []byte {
	t.Helper()
	data, err := os.ReadFile(repoPath(rel))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// checkEnv checks that every variable of env is one the broker reads and
// that the broker loads the whole set (after filling in what the platform
// provides), and returns the loaded configuration.
func checkEnv(t *testing.T, where string, env map[string]string, platform ...string) *config.Config {
	t.Helper()
	known := config.Variables()
	var environ []string
	for k, v := range env {
		if !slices.Contains(known, k) {
			t.Errorf("%s sets %s, which the broker does not read (config.Variables)", where, k)
		}
		environ = append(environ, k+"="+v)
	}
	cfg, err := config.LoadFrom(append(environ, platform...))
	if err != nil {
		t.Fatalf("%s: the broker refuses its environment:\n%v", where, err)
	}
	return cfg
}

// port returns the port of a host:port address.
func port(t *testing.T, hostport string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatalf("%q: %v", hostport, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%q: bad port", hostport)
	}
	return n
}

// splitCommand splits a command line the way Fly (shlex) and Railway do
// for the simple commands these files use; quoting is refused so that the
// split cannot differ.
func splitCommand(t *testing.T, cmd string) []string {
	t.Helper()
	if strings.ContainsAny(cmd, `"'\$`) {
		t.Fatalf("command %q: keep it free of quotes, escapes and variables", cmd)
	}
	return strings.Fields(cmd)
}

// tool finds a program the tests run for real (testkit.Tool: a failure in
// CI, a skip naming the package elsewhere).
func tool(t *testing.T, name, pkg string) string {
	t.Helper()
	return testkit.Tool(t, pkg, "the deployment files are checked with the real tool", name)
}

// emptyDatabase creates a database without the schema on the test server.
func emptyDatabase(t *testing.T) string {
	t.Helper()
	base := pgtest.NewDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(u.Path, "/") + "_empty"
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, base); err == nil {
			_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
			_ = c.Close(ctx)
		}
	})
	u.Path = "/" + name
	return u.String()
}

// freePort returns a TCP port free on 127.0.0.1, chosen below the kernel's
// ephemeral range so that ":0" listeners of concurrent tests cannot take it.
func freePort(t *testing.T) int {
	t.Helper()
	for try := 0; try < 200; try++ {
		p := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err == nil {
			ln.Close()
			return p
		}
	}
	t.Fatal("no free port found")
	return 0
}

func portString(t *testing.T, hostport string) string { return strconv.Itoa(port(t, hostport)) }

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// syncBuffer collects a child process's output while the test reads it.
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
