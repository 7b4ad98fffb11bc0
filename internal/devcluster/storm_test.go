package devcluster_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// stormPeer is one client behind the balancer, with an address of its own.
type stormPeer struct {
	id   client.Identity
	sid  string
	hc   *http.Client
	conn *client.Conn
	node string
}

// connect dials through url and says hello with the peer's session id.
func (p *stormPeer) connect(url string) (*protocol.HelloAck, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, &client.DialOptions{HTTPClient: p.hc})
	if err != nil {
		return nil, err
	}
	ack, err := c.Hello(ctx, p.id, client.HelloOptions{SessionID: p.sid})
	if err != nil {
		_ = c.CloseNow()
		return nil, err
	}
	p.conn, p.node = c, ack.Node
	return ack, nil
}

// A reconnect storm through the balancer: 60 peers behind `broker dev`'s
// balancer (each from its own address; the nodes trust the balancer, as
// broker dev configures them) lose their node and reconnect at the same
// moment through the balancer to the two survivors. Every one reattaches
// within the grace period, none refused rate_limited or capacity: the
// limits count each client, not the balancer's address (with a hello rate
// of 10/s, a bucket of 21, the storm keyed on the balancer would refuse
// most of the 60). Peers on the surviving nodes keep exchanging messages.
func TestReconnectStormThroughBalancer(t *testing.T) {
	const movers = 60
	db := pgtest.NewDB(t)
	configure := func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"} // as broker dev sets it
		c.HelloRatePerSec = 10
		c.MaxConnsPerMesh = 1000
		c.PresenceGrace = 60
	}
	a := testkit.StartNode(t, db, testkit.Options{Configure: configure})
	b := testkit.StartNode(t, db, testkit.Options{Configure: configure, Join: []*testkit.Node{a}})
	c := testkit.StartNode(t, db, testkit.Options{Configure: configure, Join: []*testkit.Node{a}})
	testkit.Eventually(t, 10*time.Second, "3-node cluster", func() bool {
		return a.Cluster().NumMembers() == 3 && b.Cluster().NumMembers() == 3 && c.Cluster().NumMembers() == 3
	})
	lb := startLB(t, 50*time.Millisecond, backendOf(a), backendOf(b), backendOf(c))
	mesh := testkit.NewMesh(t, a.Store(), 0)

	// Round-robin: connect peers until 60 are on node a; the others stay
	// on b and c.
	var onA, others []*stormPeer
	for i := 0; len(onA) < movers; i++ {
		if i >= 4*movers {
			t.Fatalf("only %d of %d connections landed on %s", len(onA), i, a.Name())
		}
		p := &stormPeer{id: mesh.AddMember(t, a.Store(), fmt.Sprint("peer", i)), sid: fmt.Sprint("storm-", i),
			hc: testkit.HTTPClientFrom(t, fmt.Sprintf("127.0.%d.%d", 1+i/200, 10+i%200))}
		if _, err := p.connect(lb.URL()); err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
		t.Cleanup(func() { _ = p.conn.CloseNow() })
		if p.node == a.Name() {
			onA = append(onA, p)
		} else {
			others = append(others, p)
		}
	}
	var sender, rcpt *stormPeer
	for _, p := range others {
		switch {
		case sender == nil && p.node == b.Name():
			sender = p
		case rcpt == nil && p.node == c.Name():
			rcpt = p
		}
	}
	if sender == nil || rcpt == nil {
		t.Fatal("no peers on both survivors")
	}
	stopHonest := testkit.HonestTraffic(t, sender.conn, rcpt.conn, rcpt.id)
	defer stopHonest()

	// Every mover sees its socket close, then all reconnect at once.
	sctx, scancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer scancel()
	if err := a.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	for i, p := range onA {
		select {
		case <-p.conn.Done():
		case <-sctx.Done():
			t.Fatalf("mover %d still connected after %s stopped", i, a.Name())
		}
	}
	start := make(chan struct{})
	stormStart := time.Now()
	errs := make([]error, len(onA))
	var wg sync.WaitGroup
	for i, p := range onA {
		wg.Go(func() {
			<-start
			// Retried only when the balancer has not yet learnt that a is
			// gone (a refused dial or a draining node): never on a limit.
			for try := 0; ; try++ {
				ack, err := p.connect(lb.URL())
				var he *client.HelloError
				switch {
				case err == nil && !ack.Reattached:
					errs[i] = fmt.Errorf("hello_ack on %s not reattached", ack.Node)
				case err == nil:
					errs[i] = nil
				case errors.As(err, &he) && he.Code != protocol.ReasonDraining, try >= 10:
					errs[i] = err
				default:
					continue
				}
				return
			}
		})
	}
	close(start)
	wg.Wait()
	took := time.Since(stormStart)
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			t.Errorf("mover %d: %v", i, err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d movers failed to reattach through the balancer", failed, movers)
	}
	if took > 15*time.Second {
		t.Fatalf("the storm took %s to reattach %d peers", took, movers)
	}
	for _, p := range onA {
		if p.node == a.Name() {
			t.Fatalf("a mover reattached to the stopped node")
		}
	}
	if sent := stopHonest(); sent == 0 {
		t.Fatal("no honest message went through during the storm")
	}
	// The movers are whole sessions again: one sends to a peer that stayed.
	if _, err := testkit.HonestSend(onA[0].conn, rcpt.conn, rcpt.id, "after the storm"); err != nil {
		t.Fatal(err)
	}
}
