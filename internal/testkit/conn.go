package testkit

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// Dial opens a WebSocket to url without a hello; it is closed when the
// test ends.
func Dial(t testing.TB, url string) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	return c
}

// Write writes a frame: raw bytes as they are, anything else as JSON.
func Write(t testing.TB, c *client.Conn, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if b, ok := v.([]byte); ok {
		err = c.WriteRaw(ctx, b)
	} else {
		err = c.WriteJSON(ctx, v)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// Send writes a send (type and a nonce filled in) and returns its ack.
func Send(t testing.TB, c *client.Conn, s protocol.Send) protocol.Ack {
	t.Helper()
	s.Type = protocol.TypeSend
	if s.Nonce == "" {
		s.Nonce = "bm9uY2U="
	}
	Write(t, c, s)
	var ack protocol.Ack
	if err := Expect(t, c, protocol.TypeAck, 10*time.Second).Decode(&ack); err != nil {
		t.Fatal(err)
	}
	return ack
}

// ExpectClose reads until the connection closes, and checks its code and
// reason.
func ExpectClose(t testing.TB, c *client.Conn, code int, reason string) {
	t.Helper()
	if ce := expectClose(t, c); ce.Code != code || ce.Reason != reason {
		t.Fatalf("closed %d %q, want %d %q", ce.Code, ce.Reason, code, reason)
	}
}

// ExpectCloseCode reads until the connection closes, and checks its code.
func ExpectCloseCode(t testing.TB, c *client.Conn, code int) {
	t.Helper()
	if ce := expectClose(t, c); ce.Code != code {
		t.Fatalf("closed %d %q, want %d", ce.Code, ce.Reason, code)
	}
}

func expectClose(t testing.TB, c *client.Conn) *client.CloseError {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		_, err := c.Next(ctx)
		var ce *client.CloseError
		if errors.As(err, &ce) {
			return ce
		}
		if err != nil {
			t.Fatalf("waiting for a close: %v", err)
		}
	}
}

// DialSilent connects and completes a hello, then never reads again: the
// connection cannot answer pings (a frozen peer). With rcvBuf > 0 its
// socket's receive buffer is that small, so what the broker can still
// write into it is bounded by the broker's own send buffer.
func DialSilent(t testing.TB, url string, id client.Identity, o client.HelloOptions, rcvBuf int) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var opts *websocket.DialOptions
	if rcvBuf > 0 {
		d := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvBuf)
			})
			return errors.Join(err, serr)
		}}
		tr := &http.Transport{DialContext: d.DialContext}
		t.Cleanup(tr.CloseIdleConnections)
		opts = &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}}
	}
	ws, _, err := websocket.Dial(ctx, url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ws.CloseNow() })
	h, _ := json.Marshal(client.NewHello(id, o))
	if err := ws.Write(ctx, websocket.MessageText, h); err != nil {
		t.Fatal(err)
	}
	_, data, err := ws.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if env, _ := protocol.DecodeEnvelope(data); env.Type != protocol.TypeHelloAck {
		t.Fatalf("want hello_ack, got %s", data)
	}
	return ws
}
