// Command broker runs a claudemesh broker node, a local dev cluster, the
// schema migrations and the operator commands.
package main

import (
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
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/alecthomas/kong"
	"github.com/bytedance/gopkg/util/gctuner"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/devcluster"
	"github.com/claudemesh/broker/internal/node"
	"github.com/claudemesh/broker/internal/store"
)

type cli struct {
	Serve   serveCmd   `cmd:"" default:"1" help:"Run a broker node (the default). Configured by environment variables; see README."`
	Migrate migrateCmd `cmd:"" help:"Apply the schema migrations to DATABASE_URL and exit."`
	Dev     devCmd     `cmd:"" help:"Run a local cluster on a private Postgres started from this machine's server binaries."`
	Admin   adminCmd   `cmd:"" help:"Operator commands: meshes, members, invites, audit log."`

	Healthcheck healthcheckCmd `cmd:"" help:"Probe a node's /health and exit 0 when it answers 200 (the container HEALTHCHECK)."`
}

// defaultGCPercent is the garbage collector's target when GOGC is not set
// and the heap is past heapFloor.
// A broker mostly holds idle connections (Claude Code sessions waiting for
// their user), so memory per connection matters more than the collector's
// CPU: with 10,000 idle connections on one node, GOGC=50 measured 36.0 KiB
// of RSS per connection against 43–46 KiB at Go's default of 100
// (docs/BENCHMARKS.md).
const defaultGCPercent = 50

// heapFloor is the heap below which the collector's target rises (up to
// GOGC 500, gctuner's ceiling): a node with a small live heap and a high
// allocation rate (messages flowing between a few hundred sessions)
// otherwise collects every few megabytes, a quarter of its CPU at 2,000
// msg/s over 3 nodes; past the floor (10,000 idle connections hold about
// 100 MB) the target is defaultGCPercent again. Each collection sets the
// next target from the heap in use (gctuner, through a finalizer).
const heapFloor = 64 << 20

// tuneGC applies defaultGCPercent with heapFloor unless the operator set
// GOGC.
func tuneGC(lookupEnv func(string) (string, bool)) {
	if _, set := lookupEnv("GOGC"); !set {
		debug.SetGCPercent(defaultGCPercent)
		gctuner.SetMinGCPercent(defaultGCPercent)
		gctuner.Tuning(heapFloor)
	}
}

func main() {
	tuneGC(os.LookupEnv)
	var c cli
	ctx := kong.Parse(&c, kong.Name("broker"),
		kong.Description("claudemesh broker: routes end-to-end-encrypted messages between Claude Code sessions."),
		kong.UsageOnError())
	if err := ctx.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "broker:", err)
		os.Exit(1)
	}
}

func newLogger(level string) *slog.Logger {
	lvl, err := config.ParseLevel(level)
	if err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// stopSignals are the signals that shut the broker down gracefully. SIGHUP
// is among them because closing the terminal of a `broker dev` sends it,
// and its default action would end the process without stopping Postgres;
// unless SIGHUP is ignored (nohup), which must stay so.
func stopSignals() []os.Signal {
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		sigs = append(sigs, syscall.SIGHUP)
	}
	return sigs
}

// signalContext is cancelled on SIGINT, SIGTERM or SIGHUP; the returned
// function reports which signal arrived.
func signalContext() (context.Context, func() string) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, stopSignals()...)
	var got os.Signal
	done := make(chan struct{})
	go func() {
		got = <-ch
		close(done)
		cancel()
	}()
	return ctx, func() string {
		select {
		case <-done:
			return got.String()
		default:
			return ""
		}
	}
}

type serveCmd struct{}

func (serveCmd) Run() error {
	cfg, err := config.Load()
	if err != nil {
		return err
	}
	if err := cfg.RequireDatabase(); err != nil {
		return err
	}
	logger := newLogger(cfg.LogLevel)
	slog.SetDefault(logger)
	ctx, which := signalContext()
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	n, err := node.Start(startCtx, node.Options{Config: cfg, Logger: logger})
	cancel()
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutdown signal", "signal", which(), "node", cfg.NodeName)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	err = n.Shutdown(sctx)
	logger.Info("shutdown complete", "node", cfg.NodeName, "err", errString(err))
	return err
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

type migrateCmd struct {
	DatabaseURL string `env:"DATABASE_URL" required:"" help:"Postgres connection string."`
}

func (m migrateCmd) Run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	applied, err := store.Migrate(ctx, m.DatabaseURL)
	if err != nil {
		return err
	}
	if len(applied) == 0 {
		fmt.Println("schema is up to date")
		return nil
	}
	fmt.Printf("applied migrations %v\n", applied)
	return nil
}

type devCmd struct {
	Nodes      int    `default:"3" help:"Number of broker nodes."`
	Data       string `default:".data" help:"Folder for the private Postgres and the demo mesh (kept across restarts)."`
	Port       int    `env:"BROKER_PORT" default:"7900" help:"HTTP/WebSocket port of the first node; the others follow."`
	GossipPort int    `default:"7946" help:"Gossip port of the first node; the others follow."`
	PGPort     int    `name:"pg-port" default:"0" help:"Port of the private Postgres (0: the same one on every start with this --data)."`
	LBPort     int    `name:"lb-port" default:"7800" help:"Port of the load balancer in front of the nodes, as in docker-compose.yml (0: none)."`
	Processes  bool   `help:"Run each node as its own process (their PIDs are printed), so that one can be killed to watch failover."`
	Keys       bool   `help:"Also print the demo mesh's keys and enrol two members with keys, for clients that speak the protocol themselves."`
	HookPort   int    `name:"hook-port" default:"7899" help:"Port on 127.0.0.1 that takes unsigned hooks from this machine (HOOK_LOCAL_ADDR of the first node; 0: none)."`
}

func (d devCmd) Run() error {
	base, err := config.Load()
	if err != nil {
		return err
	}
	logger := newLogger(base.LogLevel)
	slog.SetDefault(logger)
	ctx, which := signalContext()
	c, err := devcluster.Start(ctx, devcluster.Options{
		Nodes: d.Nodes, DataDir: d.Data, BasePort: d.Port, GossipPort: d.GossipPort, PGPort: d.PGPort,
		LBPort: d.LBPort, HookPort: d.HookPort, PublicURL: strings.TrimSpace(os.Getenv("PUBLIC_URL")), Processes: d.Processes,
		ShowKeys: d.Keys, Command: brokerCommand(), Base: base, Logger: logger, Out: os.Stdout,
	})
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutdown signal", "signal", which())
	err = c.Stop(context.Background())
	logger.Info("shutdown complete", "err", errString(err))
	return err
}

// brokerCommand is how the user runs this program, for the commands the
// banner suggests: `go run` builds into a temporary folder.
func brokerCommand() string {
	exe, err := os.Executable()
	if err != nil {
		return "broker"
	}
	if strings.Contains(exe, string(os.PathSeparator)+"go-build") {
		return "go run ./cmd/broker"
	}
	if found, err := exec.LookPath(filepath.Base(exe)); err == nil {
		if p, err := filepath.EvalSymlinks(found); err == nil && p == exe {
			return filepath.Base(exe) // on PATH
		}
	}
	return exe
}

// healthcheckCmd is the image's HEALTHCHECK: the runtime image has no shell,
// curl or wget, so the broker probes itself.
type healthcheckCmd struct {
	URL     string        `help:"URL to probe; default http://127.0.0.1:$BROKER_PORT/health (BROKER_HOST when it names one address)."`
	Port    int           `env:"BROKER_PORT" default:"7900" help:"The node's port, when --url is not given."`
	Host    string        `env:"BROKER_HOST" help:"The node's bind address, when --url is not given."`
	Timeout time.Duration `default:"3s" help:"Give up after this long."`
}

func (h healthcheckCmd) Run() error {
	url := h.URL
	if url == "" {
		host := h.Host
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			host = "127.0.0.1"
		}
		url = "http://" + net.JoinHostPort(host, strconv.Itoa(h.Port)) + "/health"
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	// No keep-alive and no proxy: one probe, straight to the node.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	summary := strings.TrimSpace(string(body))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck %s: %s %s", url, resp.Status, summary)
	}
	fmt.Println(summary)
	return nil
}

type adminCmd struct {
	DatabaseURL string `env:"DATABASE_URL" required:"" help:"Postgres connection string."`

	Mesh   meshCmd   `cmd:"" help:"Create and list meshes."`
	Member memberCmd `cmd:"" help:"Add and revoke members."`
	Invite inviteCmd `cmd:"" help:"Create signed invites."`
	Audit  auditCmd  `cmd:"" help:"List a mesh's recent audit events."`
}

func openStore(url string) (*store.Store, context.Context, func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	st, err := store.Open(ctx, url, 4)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return st, ctx, func() { st.Close(); cancel() }, nil
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

type meshCmd struct {
	Create meshCreateCmd `cmd:"" help:"Create a mesh; prints its owner key pair (keep the secret key safe)."`
	List   meshListCmd   `cmd:"" help:"List meshes."`
	Delete meshDeleteCmd `cmd:"" help:"Delete a mesh with its members, messages and audit events."`
}

type meshDeleteCmd struct {
	Mesh string `required:"" help:"Mesh id or slug."`
}

func (m meshDeleteCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	mesh, err := admin.ResolveMesh(ctx, st, m.Mesh)
	if err != nil {
		return err
	}
	if err := admin.DeleteMesh(ctx, st, mesh.ID); err != nil {
		return err
	}
	fmt.Printf("deleted mesh %s (%s)\n", mesh.ID, mesh.Slug)
	return nil
}

type meshCreateCmd struct {
	Name string `required:"" help:"Mesh name."`
	Slug string `help:"URL-safe slug (derived from the name when empty)."`
	JSON bool   `name:"json" help:"Print JSON."`
}

func (m meshCreateCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	res, err := admin.CreateMesh(ctx, st, m.Name, m.Slug)
	if err != nil {
		return err
	}
	if m.JSON {
		return printJSON(res)
	}
	fmt.Printf("mesh %s (%s)\nmeshId:         %s\nownerPubkey:    %s\nownerSecretKey: %s\n", res.Name, res.Slug, res.MeshID, res.OwnerPubkey, res.OwnerSecretKey)
	return nil
}

type meshListCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

func (m meshListCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	meshes, err := st.ListMeshes(ctx)
	if err != nil {
		return err
	}
	if m.JSON {
		if meshes == nil {
			meshes = []store.Mesh{}
		}
		return printJSON(meshes)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MESH ID\tSLUG\tNAME\tMEMBERS\tCREATED")
	for _, x := range meshes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", x.ID, x.Slug, x.Name, x.MemberCount, x.CreatedAt.Format(time.RFC3339))
	}
	return tw.Flush()
}

type memberCmd struct {
	Add    memberAddCmd    `cmd:"" help:"Enrol a pubkey in a mesh."`
	Revoke memberRevokeCmd `cmd:"" help:"Revoke a member; its live sessions are closed within seconds."`
}

type memberAddCmd struct {
	Mesh   string `required:"" help:"Mesh id or slug."`
	Pubkey string `required:"" help:"ed25519 public key, 64 hex characters."`
	Name   string `required:"" help:"Display name."`
	Role   string `default:"member" enum:"admin,member" help:"admin or member."`
	JSON   bool   `name:"json" help:"Print JSON."`
}

func (m memberAddCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	mesh, err := admin.ResolveMesh(ctx, st, m.Mesh)
	if err != nil {
		return err
	}
	mem, err := admin.AddMember(ctx, st, mesh.ID, m.Pubkey, m.Name, m.Role)
	if err != nil {
		return err
	}
	if m.JSON {
		return printJSON(map[string]string{"memberId": mem.ID})
	}
	fmt.Printf("memberId: %s\n", mem.ID)
	return nil
}

type memberRevokeCmd struct {
	Mesh   string `required:"" help:"Mesh id or slug."`
	Pubkey string `required:"" help:"The member's public key."`
	JSON   bool   `name:"json" help:"Print JSON."`
}

func (m memberRevokeCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	mesh, err := admin.ResolveMesh(ctx, st, m.Mesh)
	if err != nil {
		return err
	}
	mem, err := admin.RevokeMember(ctx, st, mesh.ID, m.Pubkey)
	if err != nil {
		return err
	}
	if m.JSON {
		return printJSON(map[string]any{"memberId": mem.ID, "revokedAt": mem.RevokedAt})
	}
	fmt.Printf("revoked member %s (%s)\n", mem.ID, mem.DisplayName)
	return nil
}

type inviteCmd struct {
	Create inviteCreateCmd `cmd:"" help:"Create an invite signed with the mesh owner's key."`
}

type inviteCreateCmd struct {
	Mesh      string        `required:"" help:"Mesh id or slug."`
	MaxUses   int           `default:"1" help:"How many peers may join with it."`
	TTL       time.Duration `name:"ttl" default:"168h" help:"How long it stays valid."`
	Role      string        `default:"member" enum:"admin,member" help:"Role given to those who join."`
	BrokerURL string        `name:"broker-url" placeholder:"URL" help:"Broker URL written into the invite (default: PUBLIC_URL, else ws://localhost:$BROKER_PORT/ws)."`
	JSON      bool          `name:"json" help:"Print JSON."`
}

func (m inviteCreateCmd) Run(a *adminCmd) error {
	brokerURL, explicit := strings.TrimSpace(m.BrokerURL), true
	if brokerURL != "" {
		if err := config.CheckPublicURL(brokerURL); err != nil {
			return fmt.Errorf("--broker-url: %w", err)
		}
	} else {
		var err error
		if brokerURL, explicit, err = config.InviteURL(os.Getenv); err != nil {
			return err
		}
	}
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	mesh, err := admin.ResolveMesh(ctx, st, m.Mesh)
	if err != nil {
		return err
	}
	inv, err := admin.CreateInvite(ctx, st, mesh.ID, m.MaxUses, m.TTL, m.Role, brokerURL)
	if err != nil {
		return err
	}
	if m.JSON {
		return printJSON(map[string]any{"token": inv.Token, "expiresAt": inv.ExpiresAt, "inviteId": inv.InviteID,
			"maxUses": inv.MaxUses, "brokerUrl": inv.BrokerURL})
	}
	if !explicit {
		fmt.Fprintf(os.Stderr, "note: PUBLIC_URL is not set, so the invite points at %s (one node);\n"+
			"      behind a load balancer set PUBLIC_URL (or --broker-url) to the URL peers connect to\n", brokerURL)
	}
	fmt.Printf("invite for mesh %q (valid until %s, %d use(s), peers connect to %s):\n%s\n",
		mesh.Slug, inv.ExpiresAt.Format(time.RFC3339), inv.MaxUses, inv.BrokerURL, inv.Token)
	fmt.Printf("to join: claudemesh join %s --name NAME\n", inv.Token)
	return nil
}

type auditCmd struct {
	Mesh  string `help:"Mesh id or slug (all meshes when empty)."`
	Type  string `help:"Only events of this type."`
	Limit int    `default:"50" help:"How many events."`
	JSON  bool   `name:"json" help:"Print JSON."`
}

func (m auditCmd) Run(a *adminCmd) error {
	st, ctx, done, err := openStore(a.DatabaseURL)
	if err != nil {
		return err
	}
	defer done()
	if m.Limit <= 0 || m.Limit > 10000 {
		return errors.New("--limit must be between 1 and 10000")
	}
	meshID := ""
	if m.Mesh != "" {
		mesh, err := admin.ResolveMesh(ctx, st, m.Mesh)
		if err != nil {
			return err
		}
		meshID = mesh.ID
	}
	events, err := st.ListAudit(ctx, meshID, m.Type, m.Limit)
	if err != nil {
		return err
	}
	if m.JSON {
		if events == nil {
			events = []store.AuditEvent{}
		}
		return printJSON(events)
	}
	return admin.WriteAuditTable(os.Stdout, events)
}
