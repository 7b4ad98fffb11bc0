package testkit

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// HonestTraffic sends messages from one honest session to another, one at
// a time, until the returned stop is called; stop returns how many went
// through and may be called again. A failed send or push fails t (with
// Errorf: it runs on a goroutine of its own).
func HonestTraffic(t testing.TB, from, to *client.Conn, toID client.Identity) (stop func() int) {
	t.Helper()
	quit := make(chan struct{})
	done := make(chan struct{})
	var sent int
	go func() {
		defer close(done)
		for i := 0; i < 100000; i++ {
			select {
			case <-quit:
				return
			default:
			}
			if _, err := HonestSend(from, to, toID, fmt.Sprint("honest-", i)); err != nil {
				t.Errorf("honest message %d: %v", i, err)
				return
			}
			sent++
		}
	}()
	var once sync.Once
	return func() int {
		once.Do(func() { close(quit); <-done })
		return sent
	}
}

// HonestSend sends body from one session to another and waits for its ack
// and its push; it returns how long the ack took.
func HonestSend(from, to *client.Conn, toID client.Identity, body string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	if err := from.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, TargetSpec: toID.Pubkey(), Nonce: "bm9uY2U=", Ciphertext: body}); err != nil {
		return 0, err
	}
	var ack protocol.Ack
	for {
		f, err := from.Next(ctx)
		if err != nil {
			return 0, fmt.Errorf("waiting for the ack: %w", err)
		}
		if f.Type == protocol.TypeAck {
			if err := f.Decode(&ack); err != nil {
				return 0, err
			}
			break
		}
	}
	took := time.Since(start)
	if !ack.Queued {
		return took, fmt.Errorf("not queued: %+v", ack)
	}
	for {
		f, err := to.Next(ctx)
		if err != nil {
			return took, fmt.Errorf("waiting for the push: %w", err)
		}
		var p protocol.Push
		if f.Type == protocol.TypePush && f.Decode(&p) == nil && p.Subtype == "" {
			if p.MessageID != ack.MessageID || p.Ciphertext != body {
				return took, fmt.Errorf("push %s %q, want %s %q", p.MessageID, p.Ciphertext, ack.MessageID, body)
			}
			return took, nil
		}
	}
}
