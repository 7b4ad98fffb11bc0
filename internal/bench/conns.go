package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/store"
)

// ConnsResult is the outcome of a conns run.
type ConnsResult struct {
	Requested    int              `json:"requested"`
	Opened       int              `json:"opened"`            // hello_ack received
	Failed       map[string]int64 `json:"failed,omitempty"`  // by hello rejection code or dial error
	Dropped      map[string]int64 `json:"dropped,omitempty"` // closed by the broker while idle, by reason
	Meshes       int              `json:"meshes"`
	Members      int              `json:"members"`
	ElapsedSec   float64          `json:"elapsedSec"`   // first dial to last hello_ack
	HellosPerSec float64          `json:"hellosPerSec"` // Opened / ElapsedSec
	HelloLatency Latency          `json:"helloLatency"` // dial + hello → hello_ack, per connection
	PerNode      []ConnsNode      `json:"perNode"`
}

// ConnsNode is one node's memory before and after taking its connections.
type ConnsNode struct {
	Name            string `json:"name"`
	Conns           int    `json:"conns"`
	RSSBeforeBytes  int64  `json:"rssBeforeBytes"`
	RSSAfterBytes   int64  `json:"rssAfterBytes"` // after the idle hold
	RSSPerConnBytes int64  `json:"rssPerConnBytes"`
	FDsBefore       int64  `json:"fdsBefore"`
	FDsAfter        int64  `json:"fdsAfter"`
	Error           string `json:"error,omitempty"`
}

// helloFrame is a pre-signed hello for one connection.
type helloFrame struct {
	id   client.Identity
	opts client.HelloOptions
	raw  []byte
}

// resignAfter is how old a pre-signed hello may get before it is signed
// again: brokers refuse timestamps more than 60 s off.
const resignAfter = 30 * time.Second

// runConns opens o.Conns idle connections, peer j on node j mod o.Nodes,
// measures the hello rate, holds them idle, and reads each node's memory
// before and after.
func runConns(ctx context.Context, o Options, st *store.Store, smp *sampler, res *Result) error {
	res.Params.Conns, res.Params.SessionsPerMember = o.Conns, o.SessionsPerMember
	res.Params.ConnsPerMesh, res.Params.HoldSec = o.ConnsPerMesh, o.Hold.Seconds()
	cr := &ConnsResult{Requested: o.Conns, Failed: map[string]int64{}, Dropped: map[string]int64{}}
	res.Conns = cr

	// Members: SessionsPerMember connections each; meshes: ConnsPerMesh
	// connections each (the cluster caps live sessions per mesh).
	members := (o.Conns + o.SessionsPerMember - 1) / o.SessionsPerMember
	membersPerMesh := members
	if o.ConnsPerMesh > 0 {
		membersPerMesh = max(1, o.ConnsPerMesh/o.SessionsPerMember)
	}
	defer cleanup(o, st, res)
	var ids []client.Identity
	for len(ids) < members {
		n := min(membersPerMesh, members-len(ids))
		m, err := seedMesh(ctx, st, fmt.Sprintf("meshbench conns %s #%d", time.Now().UTC().Format(time.RFC3339), len(res.Meshes)+1), n, 8)
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
		res.Meshes = append(res.Meshes, m.meshID)
		ids = append(ids, m.members...)
	}
	cr.Meshes, cr.Members = len(res.Meshes), members

	// Pre-sign every hello. Sessions of one member get timestamps one
	// millisecond apart: ed25519 is deterministic, and the broker refuses
	// a signature it has already accepted.
	host, _ := os.Hostname()
	signedAt := time.Now()
	hellos := make([]helloFrame, o.Conns)
	for j := range hellos {
		h := &hellos[j]
		h.id = ids[j/o.SessionsPerMember]
		h.opts = client.HelloOptions{
			SessionID: fmt.Sprintf("meshbench-%d-c%d", os.Getpid(), j), PID: int64(os.Getpid()),
			Cwd: "/meshbench", Hostname: host,
			Timestamp: signedAt.Add(-time.Duration(j%o.SessionsPerMember) * time.Millisecond),
		}
		raw, err := json.Marshal(client.NewHello(h.id, h.opts))
		if err != nil {
			return err
		}
		h.raw = raw
	}

	before := make([]usage, o.Nodes)
	beforeErr := make([]error, o.Nodes)
	for i := range o.Nodes {
		before[i], beforeErr[i] = smp.sample(ctx, i)
	}

	conns := make([]*client.Conn, o.Conns)
	defer closeConns(conns)
	lat := make([]time.Duration, o.Conns)
	var opened atomic.Int64
	var failMu sync.Mutex
	fail := func(reason string) {
		failMu.Lock()
		cr.Failed[reason]++
		failMu.Unlock()
	}
	bar := startProgress(o.Progress, fmt.Sprintf("conns %d", o.Conns), int64(o.Conns), func() (int64, string) {
		return opened.Load(), ", opened"
	})
	defer bar.finish()

	var next atomic.Int64
	var last atomic.Int64 // when the last hello_ack arrived, ns after start
	start := time.Now()
	var wg sync.WaitGroup
	for range min(o.Concurrency, o.Conns) {
		wg.Go(func() {
			for {
				j := int(next.Add(1) - 1)
				if j >= o.Conns || ctx.Err() != nil {
					return
				}
				h := &hellos[j]
				if time.Since(signedAt) > resignAfter {
					// The run is slow: re-sign with a fresh timestamp
					// (still distinct per session of a member).
					h.opts.Timestamp = time.Now().Add(-time.Duration(j%o.SessionsPerMember) * time.Millisecond)
					h.raw, _ = json.Marshal(client.NewHello(h.id, h.opts))
				}
				t := time.Now()
				c, err := openConn(ctx, o.Targets[j%o.Nodes].URL, h.raw)
				if err != nil {
					fail(connFailure(err))
					continue
				}
				conns[j] = c
				lat[j] = time.Since(t)
				opened.Add(1)
				for {
					prev, now := last.Load(), int64(time.Since(start))
					if now <= prev || last.CompareAndSwap(prev, now) {
						break
					}
				}
			}
		})
	}
	wg.Wait()
	bar.finish()
	cr.Opened = int(opened.Load())
	cr.ElapsedSec = time.Duration(last.Load()).Seconds()
	if cr.ElapsedSec > 0 {
		cr.HellosPerSec = float64(cr.Opened) / cr.ElapsedSec
	}
	okLat := lat[:0]
	for j, c := range conns {
		if c != nil {
			okLat = append(okLat, lat[j])
		}
	}
	cr.HelloLatency = Summarize(okLat)
	res.samples.hello = okLat
	if ctx.Err() != nil {
		return ctx.Err()
	}

	hold := time.NewTimer(o.Hold)
	select {
	case <-hold.C:
	case <-ctx.Done():
		hold.Stop()
		return ctx.Err()
	}
	perNode := make([]int, o.Nodes)
	for j, c := range conns {
		if c == nil {
			continue
		}
		select {
		case <-c.Done():
			cr.Dropped[closeReason(c.Err())]++
		default:
			perNode[j%o.Nodes]++
		}
	}
	for i := range o.Nodes {
		cn := ConnsNode{Name: o.Targets[i].Name, Conns: perNode[i],
			RSSBeforeBytes: before[i].rss, FDsBefore: before[i].fds}
		after, err := smp.sample(ctx, i)
		switch {
		case beforeErr[i] != nil:
			cn.Error = "before: " + beforeErr[i].Error()
		case err != nil:
			cn.Error = "after: " + err.Error()
		default:
			cn.RSSAfterBytes, cn.FDsAfter = after.rss, after.fds
			if cn.Conns > 0 {
				cn.RSSPerConnBytes = (after.rss - before[i].rss) / int64(cn.Conns)
			}
		}
		cr.PerNode = append(cr.PerNode, cn)
	}
	if cr.Opened < cr.Requested {
		res.Notes = append(res.Notes, fmt.Sprintf("only %d of %d connections opened", cr.Opened, cr.Requested))
	}
	return nil
}

// openConn dials url and completes a pre-signed hello.
func openConn(ctx context.Context, url string, hello []byte) (*client.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	// An idle v0.1-style connection receives nothing unsolicited: a small
	// frame buffer keeps the generator's own memory down.
	c, err := client.Dial(ctx, url, &client.DialOptions{Buffer: 8})
	if err != nil {
		return nil, err
	}
	if err := c.WriteRaw(ctx, hello); err != nil {
		_ = c.CloseNow()
		return nil, err
	}
	if _, err := c.WaitHelloAck(ctx); err != nil {
		_ = c.CloseNow()
		return nil, err
	}
	return c, nil
}

// connFailure names why a connection could not be opened.
func connFailure(err error) string {
	var he *client.HelloError
	var errno syscall.Errno
	switch {
	case errors.As(err, &he):
		return "hello rejected: " + he.Code
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "interrupted"
	case errors.As(err, &errno):
		return "dial: " + errno.Error()
	}
	// Other errors are kept as text, cut so that the map stays small.
	msg := err.Error()
	if len(msg) > 100 {
		msg = msg[:100] + "…"
	}
	return "error: " + msg
}

// closeConns closes the connections normally, 256 at a time.
func closeConns(conns []*client.Conn) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for _, c := range conns {
		if c == nil {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			_ = c.Close()
			<-c.Done()
		})
	}
	wg.Wait()
}
