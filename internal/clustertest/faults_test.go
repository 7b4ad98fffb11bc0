package clustertest_test

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// Every node is restarted in turn during a burst: SIGTERM (drain, exit
// 0), start again with the same name and ports, wait until the cluster is
// whole, then the next. Peers follow the nodes around; nothing acked is
// lost or duplicated.
var rollingRestart = faultScenario{
	name: "rolling_restart", label: "rolling restart of 3 nodes", procs: 3, env: []string{"LEASE_DURATION=5s"},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		var worstRecovery, worstRestart time.Duration
		for _, n := range c.procs {
			at := c.b.Mark("restart " + n.name)
			signalNode(t, n, syscall.SIGTERM)
			select {
			case <-n.exited:
				if code := exitCode(n.err); code != 0 {
					t.Fatalf("%s: SIGTERM exit code %d", n.name, code)
				}
			case <-time.After(12 * time.Second):
				t.Fatalf("%s did not exit within 12 s of SIGTERM", n.name)
			}
			n.start(t)
			waitReady(t, 30*time.Second, 3, c.procs...)
			worstRestart = max(worstRestart, time.Since(at))
			worstRecovery = max(worstRecovery, c.b.WaitRecovered(t, at, 30*time.Second))
			c.b.run(burstLoad.Before / 2)
		}
		return faultOutcome{
			result: func(time.Duration) string {
				return fmt.Sprintf("worst recovery %s; worst SIGTERM → cluster whole again %s", roundMs(worstRecovery), roundMs(worstRestart))
			},
			check: func(r faultkit.Report) {
				if r.Reconnects < burstLoad.Peers {
					t.Errorf("%d reconnections; every peer's node was restarted", r.Reconnects)
				}
			},
		}
	},
}

// Postgres stops for 10 s during a burst and starts again. The nodes stay
// up (/health 503), sends get ack errors and are retried with the same
// client_message_id; once Postgres is back everything acked is delivered
// exactly once.
var postgresStopped = faultScenario{
	name: "postgres_stopped", label: "Postgres stopped 10 s", procs: 3, env: []string{"LEASE_DURATION=5s"}, privatePG: true,
	recover: 60 * time.Second,
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		stopped := c.b.Mark("postgres stopped")
		if err := c.pg.Stop(); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 10*time.Second, "every node reports Postgres down", func() bool {
			for _, n := range c.procs {
				if h, err := getHealth(n.HTTPURL()); err != nil || h.Status != "degraded" {
					return false
				}
			}
			return true
		})
		<-time.After(time.Until(stopped.Add(10 * time.Second))) // the outage lasts 10 s
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.pg.Start(ctx); err != nil {
			t.Fatal(err)
		}
		started := c.b.Mark("postgres started")
		waitReady(t, 30*time.Second, 3, c.procs...)
		return faultOutcome{from: started,
			result: func(recovery time.Duration) string {
				return fmt.Sprintf("recovery %s after Postgres started (%s after it stopped)", roundMs(recovery), roundMs(started.Sub(stopped)+recovery))
			},
			check: func(r faultkit.Report) {
				if r.AckErrors[protocol.CodeUnavailable] == 0 {
					t.Error("no send was refused as unavailable: the outage was not felt")
				}
			},
		}
	},
}

// Postgres is restarted twice in a row during a burst (stop, start, stop,
// start, without waiting for the nodes in between).
var postgresRestartedTwice = faultScenario{
	name: "postgres_restarted_twice", label: "Postgres restarted twice in a row", procs: 3, env: []string{"LEASE_DURATION=5s"},
	privatePG: true, recover: 60 * time.Second,
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		first := c.b.Mark("postgres restart 1")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for i := 0; i < 2; i++ {
			if err := c.pg.Stop(); err != nil {
				t.Fatal(err)
			}
			if err := c.pg.Start(ctx); err != nil {
				t.Fatal(err)
			}
		}
		started := c.b.Mark("postgres restart 2 done")
		waitReady(t, 30*time.Second, 3, c.procs...)
		return faultOutcome{from: started,
			result: func(recovery time.Duration) string {
				return fmt.Sprintf("recovery %s after the second start (%s after the first stop)", roundMs(recovery), roundMs(started.Sub(first)+recovery))
			},
			check: func(r faultkit.Report) {
				if r.AckErrors[protocol.CodeUnavailable]+r.AckErrors[protocol.CodeInternal] == 0 && r.Resends == 0 {
					t.Error("no send failed or was resent: the restarts were not felt")
				}
			},
		}
	},
}

// The backends of one node's connection pools (both: synchronous and
// asynchronous commit; found by their client ports) are terminated, over
// and over, while sends commit: among them backends in the middle of a
// transaction (group commits, claims, acks). The node reconnects its pool;
// a failed commit is answered with an ack error and retried by the client.
var poolBackendsTerminated = faultScenario{
	name: "pool_backends_terminated", label: "pool backends terminated", procs: 3, env: []string{"LEASE_DURATION=5s"},
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		u, err := url.Parse(c.db)
		if err != nil {
			t.Fatal(err)
		}
		pgPort, err := strconv.Atoi(u.Port())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cc, err := pgx.ParseConfig(c.db)
		if err != nil {
			t.Fatal(err)
		}
		cc.RuntimeParams["application_name"] = "faultkit"
		killer, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			t.Fatal(err)
		}
		defer killer.Close(context.Background())

		// Terminate proc-1's pool backends every 50 ms until at least 5
		// were caught in a transaction (bounded). The relay listener is
		// spared.
		target := c.procs[0]
		at := c.b.Mark("terminate " + target.name + " pool backends")
		var rounds, terminated, midTx int
		deadline := time.Now().Add(30 * time.Second)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for midTx < 5 {
			if time.Now().After(deadline) {
				t.Fatalf("after %d rounds only %d of %d terminated backends were in a transaction", rounds, midTx, terminated)
			}
			<-tick.C
			ports, err := faultkit.LocalPortsTo(target.cmd.Process.Pid, pgPort)
			if err != nil {
				t.Fatal(err)
			}
			var all, busy int
			err = killer.QueryRow(ctx, `
				SELECT count(*), count(*) FILTER (WHERE state IN ('active', 'idle in transaction'))
				FROM (SELECT state, pg_terminate_backend(pid) AS ok FROM pg_stat_activity
				      WHERE application_name LIKE 'claudemesh-broker%' AND client_port = ANY($1)) t
				WHERE ok`, ports).Scan(&all, &busy)
			if err != nil {
				t.Fatal(err)
			}
			rounds++
			terminated += all
			midTx += busy
		}
		return faultOutcome{from: at, result: func(recovery time.Duration) string {
			return fmt.Sprintf("%d backends of %s terminated in %d rounds, %d of them mid-transaction; recovery %s",
				terminated, target.name, rounds, midTx, roundMs(recovery))
		}}
	},
}
