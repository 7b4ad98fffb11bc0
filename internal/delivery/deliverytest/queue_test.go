package deliverytest_test

import (
	"bytes"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/claudemesh/broker/internal/delivery/deliverytest"
	"github.com/claudemesh/broker/internal/relay"
)

var meshSeq atomic.Int64

// The in-memory queue passes the conformance suite (store_test runs it on
// Postgres).
func TestQueueConformance(t *testing.T) {
	deliverytest.RunQueueSuite(t, func(t *testing.T) *deliverytest.Harness {
		key, err := relay.NewEnvelopeKey(bytes.Repeat([]byte("k"), 32))
		if err != nil {
			t.Fatal(err)
		}
		q := deliverytest.NewQueue(nil, key)
		return &deliverytest.Harness{
			Queue: q, Key: key,
			Members: func(t *testing.T, n int) (string, []string) {
				mesh := fmt.Sprint("mesh-", meshSeq.Add(1))
				var members []string
				for i := range n {
					id := fmt.Sprintf("%s-m%d", mesh, i)
					q.AddMember(mesh, id)
					members = append(members, id)
				}
				return mesh, members
			},
			Listen: func(t *testing.T, channel string) <-chan string {
				out := make(chan string, 64)
				q.Subscribe(func(ch, payload string) {
					if ch == channel {
						out <- payload
					}
				})
				return out
			},
		}
	})
}
