package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// BenchmarkBurst: P peers on one in-process node each send b.N/P direct
// messages to random peers as fast as they can; reports messages/s and
// send→push percentiles. The hot path end to end: decode, group commit,
// fast path or claim, push, batched delivery marks.
func BenchmarkBurst(b *testing.B) {
	for _, peers := range []int{10, 100} {
		b.Run(fmt.Sprintf("peers=%d", peers), func(b *testing.B) { benchBurst(b, peers, 1) })
	}
}

// BenchmarkBurstCrossNode is BenchmarkBurst with peers spread over 3 nodes.
func BenchmarkBurstCrossNode(b *testing.B) {
	benchBurst(b, 30, 3)
}

func benchBurst(b *testing.B, peers, nodes int) {
	db := pgtest.NewDB(b)
	cluster := testkit.StartCluster(b, db, nodes, testkit.Options{Configure: func(c *config.Config) {
		c.MaxConnsPerMesh = 10000
	}})
	mesh := testkit.NewMesh(b, cluster[0].Store(), peers)
	conns := make([]*client.Conn, peers)
	for i := range conns {
		conns[i] = testkit.Connect(b, cluster[i%nodes].URL(), mesh.Members[i], client.HelloOptions{})
	}
	per := max(1, b.N/peers)
	total := per * peers
	var mu sync.Mutex
	lat := make([]time.Duration, 0, total)
	var wg sync.WaitGroup
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i, c := range conns {
		wg.Add(1)
		go func() { // receiver: counts pushes, latency from the embedded send time
			defer wg.Done()
			for got := 0; got < per; {
				f, err := c.Next(ctx)
				if err != nil {
					b.Error(err)
					return
				}
				if f.Type != protocol.TypePush {
					continue
				}
				var p protocol.Push
				_ = json.Unmarshal(f.Raw, &p)
				sent, _ := strconv.ParseInt(p.Ciphertext, 10, 64)
				mu.Lock()
				lat = append(lat, time.Since(time.Unix(0, sent)))
				mu.Unlock()
				got++
			}
		}()
		_ = i
	}
	b.ResetTimer()
	// Peer i sends to peer i+1 (mod P): every peer receives exactly per.
	for i, c := range conns {
		to := mesh.Members[(i+1)%peers].Pubkey()
		go func() {
			for k := 0; k < per; k++ {
				s := protocol.Send{Type: protocol.TypeSend, TargetSpec: to, Priority: "now", Nonce: "n",
					Ciphertext: strconv.FormatInt(time.Now().UnixNano(), 10)}
				if err := c.WriteJSON(ctx, s); err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	if len(lat) != total {
		b.Fatalf("received %d of %d", len(lat), total)
	}
	b.ReportMetric(float64(total)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
