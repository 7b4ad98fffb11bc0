// Command meshbench is a load generator for a claudemesh broker cluster:
// a fresh mesh of real ed25519 identities, signed hellos, real crypto_box
// envelopes, and per-message send→ack and send→push latencies, exactly-once
// delivery accounting and per-node memory. The engine is internal/bench;
// this file parses flags and wires.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
	"golang.org/x/term"

	"github.com/claudemesh/broker/internal/bench"
)

type cli struct {
	Mode string `arg:"" optional:"" enum:"burst,broadcast,rate,conns" default:"burst" help:"Workload: burst (N peers × M direct messages, pipelined), broadcast (N peers × M messages to *), rate (open loop at --rate msg/s for --duration), conns (--conns idle connections)."`

	URL         []string `name:"url" sep:"none" placeholder:"ws://HOST:PORT/ws" help:"A node of an existing cluster (repeatable); peers are spread over them round-robin."`
	MetricsURL  []string `name:"metrics-url" sep:"none" placeholder:"http://HOST:PORT/metrics" help:"Where the n-th --url node serves /metrics, when not on its own port (METRICS_ADDR)."`
	DatabaseURL string   `name:"database-url" env:"DATABASE_URL" help:"The cluster's Postgres, for seeding and cleanup through the broker's admin path (with --url)."`
	Spawn       int      `help:"Start a private cluster instead: a private Postgres and N 'broker serve' processes on 127.0.0.1."`
	BrokerBin   string   `name:"broker-bin" type:"path" help:"Broker binary for --spawn (default: go build ./cmd/broker from the working tree)."`
	PGFast      bool     `name:"pg-fast" help:"--spawn: Postgres with fsync and synchronous_commit off (not for published numbers)."`
	BasePort    int      `name:"base-port" help:"--spawn: first node's HTTP port; the others follow, then the gossip ports (default: a free range)."`
	BrokerEnv   []string `name:"broker-env" sep:"none" placeholder:"KEY=VALUE" help:"--spawn: extra environment for every node (repeatable; overrides the load-test defaults)."`
	KeepCluster bool     `name:"keep-cluster" help:"--spawn: keep the temporary folder (Postgres data, node logs)."`
	GitSHA      string   `name:"git-sha" help:"Commit the brokers were built from, recorded in the result (default: git rev-parse --short HEAD)."`

	Nodes    int           `help:"Put peers on the first N nodes only (default: all); every node is sampled."`
	Peers    int           `short:"n" default:"10" help:"Peers (mesh members) for burst, broadcast and rate."`
	Messages int           `short:"m" default:"100" help:"Messages per peer (burst, broadcast)."`
	Size     int           `default:"256" help:"Plaintext bytes per message."`
	Rate     float64       `default:"1000" help:"rate: messages per second over all peers."`
	Duration time.Duration `default:"10s" help:"rate: length of the sending phase."`

	Conns             int           `default:"1000" help:"conns: connections to open."`
	SessionsPerMember int           `name:"sessions-per-member" default:"10" help:"conns: sessions sharing one member identity."`
	ConnsPerMesh      int           `name:"conns-per-mesh" help:"conns: connections per mesh (default: one mesh; mind MAX_CONNECTIONS_PER_MESH)."`
	Concurrency       int           `default:"64" help:"Dials in flight."`
	Hold              time.Duration `default:"5s" help:"conns: idle time before reading each node's memory."`

	DrainTimeout time.Duration `name:"drain-timeout" default:"60s" help:"How long to wait after the last send for outstanding acks and pushes."`
	Settle       time.Duration `default:"1s" help:"How long to keep listening for late duplicates once everything arrived."`
	PGStatements int           `name:"pg-statements" placeholder:"N" help:"Report the N statements that took Postgres the most execution time during the run (pg_stat_statements, which costs Postgres a little; --spawn preloads it, a --database-url server must)."`
	StatsWait    time.Duration `name:"stats-wait" default:"11s" help:"How long Postgres' statistics must stand still after the drain before they are read for row writes and transactions per message (backends publish them 10 s late or more; at most 6 times as long); negative for none."`
	Seed         uint64        `help:"Seed for the random targets (default: random, recorded in the result)."`
	Keep         bool          `help:"Keep the bench mesh(es) in the database."`
	Timeout      time.Duration `default:"30m" help:"Upper bound for the whole run."`

	JSON    bool   `name:"json" help:"Print the result as JSON instead of a table."`
	Save    string `type:"path" placeholder:"out.json" help:"Also write the JSON result to this file."`
	Plot    string `type:"path" placeholder:"out.png" help:"Write a PNG of the latency distribution (CDF, log time axis)."`
	Quiet   bool   `short:"q" help:"No progress bar (there is none when stderr is not a terminal)."`
	Verbose bool   `short:"v" help:"Log what happens (to stderr)."`

	CPUProfile string `name:"cpu-profile" type:"path" placeholder:"gen.pprof" help:"Write a CPU profile of meshbench itself (the generator, not the brokers) for the run to this file."`
}

func main() {
	var c cli
	kctx := kong.Parse(&c, kong.Name("meshbench"),
		kong.Description("Load generator for a claudemesh broker cluster. Seeds a fresh mesh through the admin path, "+
			"drives it with signed hellos and real end-to-end-encrypted envelopes, reports latencies, "+
			"exactly-once delivery and each node's memory, and deletes the mesh again."),
		kong.UsageOnError())
	kctx.FatalIfErrorf(c.run())
}

func (c *cli) run() error {
	if (c.Spawn > 0) == (len(c.URL) > 0) {
		return fmt.Errorf("give either --spawn N or --url (with --database-url)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal the run winds down and cleans up; a second
	// one kills meshbench outright.
	context.AfterFunc(ctx, stop)
	ctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()

	level := slog.LevelWarn
	if c.Verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if _, err := bench.RaiseFDLimit(); err != nil {
		logger.Warn("cannot raise the open-file limit", "err", err)
	}

	opts := bench.Options{
		Mode: bench.Mode(c.Mode), Nodes: c.Nodes, DatabaseURL: c.DatabaseURL,
		Peers: c.Peers, Messages: c.Messages, Size: c.Size, Rate: c.Rate, Duration: c.Duration,
		Conns: c.Conns, SessionsPerMember: c.SessionsPerMember, ConnsPerMesh: c.ConnsPerMesh,
		Concurrency: c.Concurrency, Hold: c.Hold, DrainTimeout: c.DrainTimeout, Settle: c.Settle,
		StatsWait: c.StatsWait, PGStatements: c.PGStatements,
		Seed: c.Seed, Keep: c.Keep, Logger: logger,
		Meta: map[string]string{"command": "meshbench " + strings.Join(os.Args[1:], " ")},
	}
	if c.StatsWait == 0 {
		opts.StatsWait = -1
	}
	if c.Settle == 0 {
		opts.Settle = -1 // --settle 0 means none
	}
	if !c.Quiet && term.IsTerminal(int(os.Stderr.Fd())) {
		opts.Progress = os.Stderr
	}
	sha := c.GitSHA
	if sha == "" {
		sha = gitHead()
	}
	if sha != "" {
		opts.Meta["commit"] = sha
	}

	if c.Spawn > 0 {
		broker := c.BrokerBin
		if broker == "" {
			broker = "built from the working tree (uncommitted changes included)"
		}
		fmt.Fprintf(os.Stderr, "meshbench: starting Postgres and %d broker nodes …\n", c.Spawn)
		cl, err := bench.Spawn(ctx, bench.SpawnOptions{
			Nodes: c.Spawn, BrokerBin: c.BrokerBin, PGFast: c.PGFast, PGStatements: c.PGStatements > 0, BasePort: c.BasePort,
			Env: c.BrokerEnv, GitSHA: sha, KeepDir: c.KeepCluster, Logger: logger,
		})
		if err != nil {
			return err
		}
		defer func() {
			if err := cl.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "meshbench: cluster:", err)
			}
		}()
		durability := "durable: fsync on, synchronous_commit on"
		if c.PGFast {
			durability = "fast: fsync off, synchronous_commit off"
		}
		opts.Targets, opts.DatabaseURL, opts.PostgresPID = cl.Targets, cl.DatabaseURL, cl.PostgresPID
		opts.Meta["cluster"] = fmt.Sprintf("%d spawned 'broker serve' processes on 127.0.0.1 and a private %s (%s)", c.Spawn, cl.Postgres, durability)
		opts.Meta["broker"] = broker
		if len(c.BrokerEnv) > 0 {
			opts.Meta["brokerEnv"] = strings.Join(c.BrokerEnv, " ")
		}
	} else {
		if len(c.MetricsURL) > len(c.URL) {
			return fmt.Errorf("more --metrics-url than --url")
		}
		for i, u := range c.URL {
			t := bench.Target{URL: u}
			if i < len(c.MetricsURL) {
				t.MetricsURL = c.MetricsURL[i]
			}
			opts.Targets = append(opts.Targets, t)
		}
		opts.Meta["cluster"] = "existing: " + strings.Join(c.URL, " ")
	}

	if c.CPUProfile != "" {
		f, err := os.Create(c.CPUProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "meshbench: cpu profile:", err)
			}
		}()
	}
	res, err := bench.Run(ctx, opts)
	if res.Mode == "" {
		return err
	}
	if c.JSON {
		if werr := bench.WriteJSON(os.Stdout, res); werr != nil {
			return werr
		}
	} else if werr := bench.WriteTable(os.Stdout, res); werr != nil {
		return werr
	}
	if c.Save != "" {
		if serr := writeFile(c.Save, func(w io.Writer) error { return bench.WriteJSON(w, res) }); serr != nil {
			fmt.Fprintln(os.Stderr, "meshbench:", serr)
		}
	}
	if c.Plot != "" {
		if perr := writeFile(c.Plot, func(w io.Writer) error { return bench.WritePlot(w, res) }); perr != nil {
			fmt.Fprintln(os.Stderr, "meshbench:", perr)
		}
	}
	return err
}

// writeFile creates path and fills it with write; on failure it removes
// the partial file.
func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

// gitHead is the short commit of the working tree, or "" outside a
// repository.
func gitHead() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
