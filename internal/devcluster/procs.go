package devcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a node running as its own process (Options.Processes): the
// broker binary re-executed as `serve`, configured by environment.
type Proc struct {
	Name    string
	PID     int
	URL     string // ws://host:port/ws
	HTTPURL string

	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status; valid once done is closed
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the process's exit status once Done is closed.
func (p *Proc) Err() error { <-p.done; return p.err }

// spawner starts child processes from one goroutine locked to its OS
// thread: on Linux a child gets SIGTERM when the thread that started it
// exits (Pdeathsig), and the Go runtime may retire other threads at any
// time. Its thread lives until close, which runs after the children
// stopped; so a child outlives neither the dev cluster nor a parent that
// was killed outright.
type spawner struct {
	reqs chan spawnReq
	wg   sync.WaitGroup
}

type spawnReq struct {
	cmd   *exec.Cmd
	reply chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		runtime.LockOSThread()
		// Never unlocked: the thread ends with the goroutine, which is the
		// point (see above).
		for r := range s.reqs {
			r.reply <- r.cmd.Start()
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	reply := make(chan error, 1)
	s.reqs <- spawnReq{cmd: cmd, reply: reply}
	return <-reply
}

func (s *spawner) close() {
	close(s.reqs)
	s.wg.Wait()
}

// childEnv is the parent's environment with the variables set by the dev
// cluster replaced.
func childEnv(set map[string]string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := set[k]; !ok {
			env = append(env, kv)
		}
	}
	for k, v := range set {
		env = append(env, k+"="+v)
	}
	return env
}

// startProc starts one node process and returns once its /health answers
// 200, or with an error when it exits first or the deadline passes.
func (c *Cluster) startProc(ctx context.Context, exe string, name, httpURL, wsURL string, env map[string]string, out io.Writer) (*Proc, error) {
	cmd := exec.Command(exe, "serve")
	cmd.Env = childEnv(env)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = childSysProcAttr()
	if err := c.spawn.start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, PID: cmd.Process.Pid, URL: wsURL, HTTPURL: httpURL, cmd: cmd, done: make(chan struct{})}
	c.Procs = append(c.Procs, p)
	c.procWG.Add(1)
	go func() {
		defer c.procWG.Done()
		p.err = cmd.Wait()
		close(p.done)
		if !c.stopping.Load() {
			c.notify(fmt.Sprintf("%s (PID %d) exited: %v; the load balancer routes to the others", p.Name, p.PID, exitReason(p.err)))
		}
	}()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if healthy(ctx, hc, httpURL+"/health") {
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s (PID %d) exited while starting: %v (its log is above)", name, p.PID, exitReason(p.err))
		case <-deadline.C:
			return nil, fmt.Errorf("%s (PID %d) did not answer %s/health within a minute", name, p.PID, httpURL)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

func healthy(ctx context.Context, hc *http.Client, url string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := hc.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func exitReason(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// stopProcs asks every node process to shut down (SIGTERM: the graceful
// path, sockets closed with 1001) and waits; one that has not exited
// after grace is killed.
func (c *Cluster) stopProcs(grace time.Duration) error {
	for _, p := range c.Procs {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	var errs []error
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for _, p := range c.Procs {
		select {
		case <-p.done:
		case <-timer.C:
			// Past the grace period every remaining child is killed.
			for _, q := range c.Procs {
				_ = q.cmd.Process.Kill()
			}
			<-p.done
			errs = append(errs, fmt.Errorf("%s (PID %d) did not stop within %s; killed", p.Name, p.PID, grace))
		}
	}
	c.procWG.Wait()
	return errors.Join(errs...)
}
