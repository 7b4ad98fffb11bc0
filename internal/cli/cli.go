// Package cli is the `claudemesh` command: keys, invites, messages, peers,
// status, Claude Code hooks and settings, and the MCP server. Run executes
// one command line against an Env, so tests drive the whole command in
// process; cmd/claudemesh only wires the real environment.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/alecthomas/kong"

	"github.com/claudemesh/broker/internal/claudecode"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/peer"
	"github.com/claudemesh/broker/internal/profile"
	"github.com/claudemesh/broker/internal/sanitize"
)

// Version is the claudemesh CLI version.
const Version = "0.1.0"

// Env is the world a command runs in.
type Env struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	Home           string
	Cwd            string
	Hostname       string
	// Executable is the path `install` registers (this binary).
	Executable string
	// SessionPID finds the Claude Code process (see claudecode.SessionPID).
	SessionPID func() (int, bool)
	HTTPClient *http.Client
	Now        func() time.Time
}

// OSEnv is the process's real environment.
func OSEnv() Env {
	home, _ := os.UserHomeDir()
	cwd, _ := os.Getwd()
	host, _ := os.Hostname()
	exe, err := os.Executable()
	if err == nil {
		if p, err := filepath.EvalSymlinks(exe); err == nil {
			exe = p
		}
	} else {
		exe = "claudemesh"
	}
	return Env{
		Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv,
		Home: home, Cwd: cwd, Hostname: host, Executable: exe,
		SessionPID: claudecode.SessionPID, HTTPClient: &http.Client{Timeout: 30 * time.Second}, Now: time.Now,
	}
}

// Environment variables read by the command.
const (
	EnvMesh       = "CLAUDEMESH_MESH"
	EnvBrokerURLs = "CLAUDEMESH_BROKER_URLS"
	EnvDebug      = "CLAUDEMESH_DEBUG"
)

// Globals are the flags every command takes.
type Globals struct {
	ConfigDir string           `name:"config-dir" placeholder:"DIR" help:"Configuration folder (default: $CLAUDEMESH_CONFIG_DIR, else ~/.claudemesh)."`
	Mesh      string           `placeholder:"MESH" help:"Mesh to act on: slug, name or id (default: $CLAUDEMESH_MESH, else the default mesh)."`
	Broker    []string         `placeholder:"URL" help:"Broker URL to use instead of the mesh's; repeat for failover nodes (default: $CLAUDEMESH_BROKER_URLS, comma-separated)."`
	Verbose   bool             `short:"v" help:"Log connection details to stderr."`
	Version   kong.VersionFlag `help:"Print the version."`
}

type cliArgs struct {
	Globals

	Keygen    keygenCmd    `cmd:"" help:"Create your identity key pair (ed25519)."`
	Join      joinCmd      `cmd:"" help:"Join a mesh with an invite."`
	Meshes    meshesCmd    `cmd:"" help:"List the meshes you joined, or choose the default."`
	Send      sendCmd      `cmd:"" help:"Send an end-to-end encrypted message."`
	Inbox     inboxCmd     `cmd:"" help:"Show messages received (and fetch waiting ones)."`
	Listen    listenCmd    `cmd:"" help:"Stay connected and print messages as they arrive."`
	Peers     peersCmd     `cmd:"" help:"List the sessions online in the mesh."`
	Members   membersCmd   `cmd:"" help:"List the mesh's members, online or not (anyone here can be messaged by name)."`
	Status    statusCmd    `cmd:"" help:"Set the status of this directory's running session: idle, working or dnd."`
	Summary   summaryCmd   `cmd:"" help:"Set the summary of this directory's running session."`
	Outbox    outboxCmd    `cmd:"" help:"List messages not yet accepted by the broker, and rejected ones."`
	Hook      hookCmd      `cmd:"" help:"Claude Code hook: reads the hook event on stdin and reports working/idle."`
	Install   installCmd   `cmd:"" help:"Register the hooks and the MCP server in Claude Code's settings."`
	Uninstall uninstallCmd `cmd:"" help:"Remove exactly what install added to Claude Code's settings (backups are kept)."`
	MCP       mcpCmd       `cmd:"" name:"mcp" help:"Run the MCP server for Claude Code on stdin/stdout."`
}

// exitPanic carries kong's exit code out of a parse (for --help).
type exitPanic int

// Run executes one command line and returns the exit status: 0 on success,
// 1 when the command failed, 2 for a usage error.
func Run(ctx context.Context, args []string, env Env) (code int) {
	var c cliArgs
	parser, err := kong.New(&c,
		kong.Name("claudemesh"),
		kong.Description("claudemesh connects Claude Code sessions: end-to-end encrypted messages, presence and status through a broker cluster."),
		kong.Writers(env.Stdout, env.Stderr),
		kong.Exit(func(code int) { panic(exitPanic(code)) }),
		kong.UsageOnError(),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
		kong.Vars{"version": Version},
	)
	if err != nil {
		fmt.Fprintln(env.Stderr, "claudemesh:", err)
		return 1
	}
	defer func() {
		if r := recover(); r != nil {
			ep, ok := r.(exitPanic)
			if !ok {
				panic(r)
			}
			code = int(ep)
		}
	}()
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintln(env.Stderr, "claudemesh:", err)
		fmt.Fprintln(env.Stderr, "run `claudemesh --help` for usage")
		return 2
	}
	a := &app{ctx: ctx, env: env, g: &c.Globals}
	a.resolveGlobals()
	if err := kctx.Run(a); err != nil {
		fmt.Fprintln(env.Stderr, "claudemesh:", err)
		return 1
	}
	return 0
}

// app is what commands run with.
type app struct {
	ctx context.Context
	env Env
	g   *Globals
}

func (a *app) resolveGlobals() {
	if a.g.Mesh == "" {
		a.g.Mesh = a.env.Getenv(EnvMesh)
	}
	if len(a.g.Broker) == 0 {
		for _, u := range strings.Split(a.env.Getenv(EnvBrokerURLs), ",") {
			if u = strings.TrimSpace(u); u != "" {
				a.g.Broker = append(a.g.Broker, u)
			}
		}
	}
}

func (a *app) now() time.Time {
	if a.env.Now != nil {
		return a.env.Now()
	}
	return time.Now()
}

func (a *app) configDir() (string, error) {
	if a.g.ConfigDir != "" {
		return filepath.Abs(a.g.ConfigDir)
	}
	return profile.Dir(a.env.Getenv, a.env.Home)
}

// defaultConfigDir reports whether the folder is the default one (then
// registrations need not name it).
func (a *app) defaultConfigDir(dir string) bool {
	return a.env.Home != "" && dir == filepath.Join(a.env.Home, ".claudemesh")
}

func (a *app) profile() (*profile.Profile, error) {
	dir, err := a.configDir()
	if err != nil {
		return nil, err
	}
	return profile.Open(dir)
}

// selected is a loaded profile and the mesh to act on.
type selected struct {
	p    *profile.Profile
	id   *profile.Identity
	mesh *profile.Mesh
}

func (a *app) selectMesh() (*selected, error) {
	p, err := a.profile()
	if err != nil {
		return nil, err
	}
	ms, err := p.LoadMeshes()
	if err != nil {
		return nil, err
	}
	m, err := ms.Select(a.g.Mesh)
	if err != nil {
		return nil, err
	}
	id, err := p.LoadIdentity()
	if err != nil {
		return nil, err
	}
	return &selected{p: p, id: id, mesh: m}, nil
}

func (a *app) logger() *slog.Logger {
	level := slog.LevelError + 1 // silent
	if a.g.Verbose || a.env.Getenv(EnvDebug) != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(a.env.Stderr, &slog.HandlerOptions{Level: level}))
}

// serviceLogger is for long-running sessions (mcp, listen): warnings by
// default, everything with -v.
func (a *app) serviceLogger() *slog.Logger {
	level := slog.LevelWarn
	if a.g.Verbose || a.env.Getenv(EnvDebug) != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(a.env.Stderr, &slog.HandlerOptions{Level: level}))
}

// sessionOptions adjust openSession.
type sessionOptions struct {
	persistent bool
	// sendOnly: a command that only sends or lists; the broker never hands
	// it a message (what waits belongs to the member's real session).
	sendOnly  bool
	groups    []string
	onMessage func(client.Message)
	onEvent   func(client.Event)
	logger    *slog.Logger
}

func (a *app) openSession(sel *selected, o sessionOptions) (*peer.Session, error) {
	st, err := sel.p.OpenState()
	if err != nil {
		return nil, err
	}
	var pid int64
	if a.env.SessionPID != nil {
		n, _ := a.env.SessionPID()
		pid = int64(n)
	}
	logger := o.logger
	if logger == nil {
		logger = a.logger()
	}
	return peer.Start(peer.Config{
		Identity: sel.id, Mesh: sel.mesh, Store: st, URLs: a.g.Broker, Cwd: a.env.Cwd, PID: pid,
		Hostname: a.env.Hostname, Groups: o.groups, Persistent: o.persistent, SendOnly: o.sendOnly, OnMessage: o.onMessage, OnEvent: o.onEvent,
		Logger: logger,
	})
}

// printJSON prints v indented; text from peers stays exact, with the runes
// a terminal could act on escaped (sanitize.JSON).
func (a *app) printJSON(v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = a.env.Stdout.Write(append(sanitize.JSON(data), '\n'))
	return err
}

// printJSONLine prints v as one line of JSON (listen --json).
func (a *app) printJSONLine(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = a.env.Stdout.Write(append(sanitize.JSON(data), '\n'))
	return err
}

func (a *app) printf(format string, args ...any) {
	fmt.Fprintf(a.env.Stdout, format, args...)
}

func (a *app) warnf(format string, args ...any) {
	fmt.Fprintf(a.env.Stderr, "claudemesh: "+format+"\n", args...)
}

// defaultDisplayName is user@host.
func (a *app) defaultDisplayName() string {
	name := a.env.Getenv("USER")
	if name == "" {
		if u, err := user.Current(); err == nil {
			name = u.Username
		}
	}
	if name == "" {
		name = "claude"
	}
	if a.env.Hostname != "" {
		name += "@" + strings.Split(a.env.Hostname, ".")[0]
	}
	return name
}

// isPermanent reports connection errors that retrying will not fix.
func isPermanent(err error) bool {
	var ue *client.UnreachableError
	return err != nil && !errors.As(err, &ue) && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, client.ErrNotConnected)
}

func short(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
