// Package pgembed runs a private PostgreSQL server from the machine's own
// server binaries (initdb, pg_ctl, postgres). `broker dev` uses it for the
// embedded default and the test suite for its throwaway databases.
//
// When the process runs as root the server runs as the "postgres" user,
// because PostgreSQL refuses to run as root.
package pgembed

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Options configure a server. DataDir is required.
type Options struct {
	DataDir string // created and initialised if it holds no cluster yet
	Port    int    // 0 picks a free port on 127.0.0.1
	// Fast trades durability for speed (fsync off): for tests only.
	Fast bool
	// BinDir overrides where initdb and pg_ctl are looked up.
	BinDir string
	// Settings are extra server settings, each "name=value" with no
	// space in it (passed to the server as -c name=value).
	Settings []string
	// MaxConnections defaults to 300.
	MaxConnections int
	// PortFallback lets Start pick a free port when Port is taken by
	// another program, instead of failing.
	PortFallback bool
	Logger       *slog.Logger
	// Notify receives one-line explanations meant for the user: a stale
	// postmaster.pid removed, a server left running by an earlier run
	// stopped, a port fallback. Nil sends them to Logger.
	Notify func(string)
}

// Server is a running (or stopped) private PostgreSQL server.
type Server struct {
	opts   Options
	bin    string
	port   int
	cred   *syscall.Credential // nil unless running as root
	logger *slog.Logger
}

// ErrNoBinaries means the PostgreSQL server binaries are not installed.
var ErrNoBinaries = errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin; " +
	"install them (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@15) or set DATABASE_URL to an existing server")

// ErrUnreachableDir means that, running as root, the data folder lies under
// a directory the postgres user may not enter.
var ErrUnreachableDir = errors.New("pgembed: data folder unreachable for the postgres user")

// FindBinaries returns the directory holding initdb and pg_ctl.
func FindBinaries() (string, error) {
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		dir := filepath.Dir(p)
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	matches2, _ := filepath.Glob("/usr/local/opt/postgresql*/bin/pg_ctl")
	matches = append(matches, matches2...)
	// Highest major version first.
	sort.Slice(matches, func(i, j int) bool { return versionOf(matches[i]) > versionOf(matches[j]) })
	for _, m := range matches {
		dir := filepath.Dir(m)
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	return "", ErrNoBinaries
}

func versionOf(path string) int {
	for _, part := range strings.Split(path, string(filepath.Separator)) {
		if n, err := strconv.Atoi(part); err == nil {
			return n
		}
	}
	return 0
}

// Start initialises DataDir if needed and starts the server.
func Start(ctx context.Context, opts Options) (*Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("pgembed: DataDir is required")
	}
	if opts.MaxConnections == 0 {
		opts.MaxConnections = 300
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	bin := opts.BinDir
	if bin == "" {
		var err error
		if bin, err = FindBinaries(); err != nil {
			return nil, err
		}
	}
	abs, err := filepath.Abs(opts.DataDir)
	if err != nil {
		return nil, err
	}
	opts.DataDir = abs
	s := &Server{opts: opts, bin: bin, logger: logger}
	if os.Geteuid() == 0 {
		cred, err := postgresUser()
		if err != nil {
			return nil, err
		}
		s.cred = cred
	}
	if err := s.prepareDir(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(abs, "PG_VERSION")); errors.Is(err, os.ErrNotExist) {
		if err := s.initdb(ctx); err != nil {
			return nil, err
		}
	}
	// A server an earlier run left behind may hold the folder and the
	// port: deal with it before choosing the port.
	if err := s.recoverPIDFile(ctx); err != nil {
		return nil, err
	}
	s.port = opts.Port
	if s.port != 0 && !portFree(s.port) {
		if !opts.PortFallback {
			return nil, fmt.Errorf("pgembed: port %d on 127.0.0.1 is taken by another program; choose another one", s.port)
		}
		want := s.port
		if s.port, err = freePort(); err != nil {
			return nil, err
		}
		s.notify(fmt.Sprintf("postgres: port %d is taken by another program; using %d", want, s.port))
	}
	if s.port == 0 {
		if s.port, err = freePort(); err != nil {
			return nil, err
		}
	}
	if err := s.Start(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) notify(msg string) {
	if s.opts.Notify != nil {
		s.opts.Notify(msg)
		return
	}
	s.logger.Info(msg)
}

func postgresUser() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgembed: running as root needs a 'postgres' user to run the server as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// prepareDir creates the data folder and, when running as root, hands it to
// the postgres user and makes sure that user can reach it.
func (s *Server) prepareDir() error {
	// Parents we create must be enterable by the postgres user; the data
	// folder itself is private (Postgres insists on 0700).
	if err := os.MkdirAll(filepath.Dir(s.opts.DataDir), 0o755); err != nil {
		return fmt.Errorf("pgembed: create data dir: %w", err)
	}
	if err := os.Mkdir(s.opts.DataDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("pgembed: create data dir: %w", err)
	}
	if s.cred == nil {
		return nil
	}
	if err := filepath.WalkDir(s.opts.DataDir, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, int(s.cred.Uid), int(s.cred.Gid))
	}); err != nil {
		return fmt.Errorf("pgembed: chown data dir to postgres: %w", err)
	}
	// Every parent must be searchable by the postgres user.
	for dir := filepath.Dir(s.opts.DataDir); ; dir = filepath.Dir(dir) {
		st, err := os.Stat(dir)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%w: the postgres user cannot reach %s because %s is not searchable by others; "+
				"choose a data folder elsewhere (e.g. --data /var/tmp/claudemesh) or chmod o+x %s", ErrUnreachableDir, s.opts.DataDir, dir, dir)
		}
		if dir == "/" || dir == "." {
			return nil
		}
	}
}

func (s *Server) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(s.bin, name), args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "TZ=UTC")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
		cmd.Dir = "/"
	}
	return cmd
}

func (s *Server) initdb(ctx context.Context) error {
	s.logger.Info("initialising postgres data folder", "dir", s.opts.DataDir)
	args := []string{"-D", s.opts.DataDir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"}
	if s.opts.Fast {
		args = append(args, "--no-sync")
	}
	out, err := s.command(ctx, "initdb", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgembed: initdb: %w: %s", err, lastLines(out, 8))
	}
	return nil
}

// Start starts a stopped server on its port; it waits until the server
// accepts connections.
func (s *Server) Start(ctx context.Context) error {
	settings := []string{
		"-p", strconv.Itoa(s.port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=",
		"-c", "max_connections=" + strconv.Itoa(s.opts.MaxConnections),
		"-c", "shared_buffers=128MB",
		"-c", "log_min_messages=warning",
		"-c", "log_min_error_statement=panic",
	}
	if s.opts.Fast {
		settings = append(settings, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	for _, kv := range s.opts.Settings {
		settings = append(settings, "-c", kv)
	}
	logFile := filepath.Join(s.opts.DataDir, "server.log")
	logStart := fileSize(logFile)
	cmd := s.command(ctx, "pg_ctl", "-D", s.opts.DataDir, "-l", logFile, "-w", "-t", "60", "-o", strings.Join(settings, " "), "start")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgembed: postgres did not start (%v): %s (full log: %s)", err, startFailure(out, logFile, logStart), logFile)
	}
	// pg_ctl -w returns once the server is ready; check we can connect.
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := pgx.Connect(ctx, s.URL("postgres"))
		if err == nil {
			conn.Close(ctx)
			s.logger.Info("postgres started", "port", s.port, "dir", s.opts.DataDir)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("pgembed: server started but refuses connections: %w", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop stops the server (fast shutdown: open transactions are rolled back).
func (s *Server) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := s.command(ctx, "pg_ctl", "-D", s.opts.DataDir, "-m", "fast", "-w", "stop").CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "Is server running?") {
			return nil
		}
		return fmt.Errorf("pgembed: pg_ctl stop: %w: %s", err, lastLines(out, 4))
	}
	return nil
}

// Port is the TCP port the server listens on (127.0.0.1).
func (s *Server) Port() int { return s.port }

// DataDir is the server's data folder.
func (s *Server) DataDir() string { return s.opts.DataDir }

// URL is the connection string for database db.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// CreateDatabase creates database name, optionally as a copy of template.
func (s *Server) CreateDatabase(ctx context.Context, name, template string) error {
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	sql := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize()
	if template != "" {
		sql += " TEMPLATE " + pgx.Identifier{template}.Sanitize()
	}
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("pgembed: create database %s: %w", name, err)
	}
	return nil
}

// DropDatabase drops database name, disconnecting its clients.
func (s *Server) DropDatabase(ctx context.Context, name string) error {
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	return err
}

// DatabaseExists reports whether database name exists.
func (s *Server) DatabaseExists(ctx context.Context, name string) (bool, error) {
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		return false, err
	}
	defer conn.Close(ctx)
	var ok bool
	err = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&ok)
	return ok, err
}

// portFree reports whether nothing listens on 127.0.0.1:port.
func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// startFailure is the one line that says why the server did not start: the
// first FATAL (or PANIC) the server logged during this attempt, the LOG or
// ERROR line before it that usually names the cause, and the first HINT;
// else pg_ctl's last line. The log itself can be long and stays in its file.
func startFailure(pgctlOut []byte, logFile string, from int64) string {
	var fresh []byte
	if f, err := os.Open(logFile); err == nil {
		if _, err := f.Seek(from, io.SeekStart); err == nil {
			fresh, _ = io.ReadAll(io.LimitReader(f, 1<<20))
		}
		f.Close()
	}
	// The server writes "<time> UTC [pid] LEVEL:  message".
	after := func(line, level string) (string, bool) {
		i := strings.Index(line, "] "+level+":")
		if i < 0 {
			return "", false
		}
		return strings.TrimSpace(line[i+len(level)+3:]), true
	}
	var reason, cause, hint string
	for _, line := range strings.Split(string(fresh), "\n") {
		if m, ok := after(line, "HINT"); ok && hint == "" {
			hint = m
		}
		if reason != "" {
			continue
		}
		if m, ok := after(line, "FATAL"); ok {
			reason = m
		} else if m, ok := after(line, "PANIC"); ok {
			reason = m
		} else if m, ok := after(line, "LOG"); ok && !strings.HasPrefix(m, "starting PostgreSQL") && !strings.HasPrefix(m, "listening on") {
			cause = m
		} else if m, ok := after(line, "ERROR"); ok {
			cause = m
		}
	}
	if reason == "" {
		return lastLines(pgctlOut, 1)
	}
	if cause != "" {
		reason += ": " + cause
	}
	if hint != "" {
		reason += " (" + hint + ")"
	}
	return reason
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
