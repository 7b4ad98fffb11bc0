// Package client speaks the claudemesh broker protocol from Go. Conn is one
// WebSocket connection with a signed hello and raw frame access; the
// tests, the CLI and the load generator build on it.
package client

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/protocol"
)

// Identity is a member's key pair in a mesh.
type Identity struct {
	MeshID   string
	MemberID string
	Priv     ed25519.PrivateKey
}

// Pubkey is the identity's public key as 64 lowercase hex characters.
func (id Identity) Pubkey() string {
	return hex.EncodeToString(id.Priv.Public().(ed25519.PublicKey))
}

// PublicKey is the identity's public key.
func (id Identity) PublicKey() ed25519.PublicKey { return id.Priv.Public().(ed25519.PublicKey) }

// Frame is one frame received from the broker.
type Frame struct {
	Type string
	Raw  []byte
}

// Decode unmarshals the frame into v.
func (f Frame) Decode(v any) error { return json.Unmarshal(f.Raw, v) }

// CloseError reports how the broker closed the connection.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string { return fmt.Sprintf("connection closed: %d %s", e.Code, e.Reason) }

// HandshakeError is a WebSocket upgrade the server answered with an HTTP
// error (429 too many connections from this address, 503 while a node
// starts or stops, …).
type HandshakeError struct {
	URL        string
	Status     int
	RetryAfter time.Duration // from the Retry-After header; zero when absent
	Err        error
}

func (e *HandshakeError) Error() string {
	return fmt.Sprintf("dial %s: HTTP %d %s", e.URL, e.Status, http.StatusText(e.Status))
}

func (e *HandshakeError) Unwrap() error { return e.Err }

// retryAfter reads a Retry-After header given in seconds (the HTTP-date
// form is not used by brokers); zero when absent or unreadable.
func retryAfter(v string) time.Duration {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n <= 0 {
		return 0
	}
	return time.Duration(min(n, 3600)) * time.Second
}

// ErrClosed is returned once the connection is gone without a close frame.
var ErrClosed = errors.New("connection closed")

// Conn is a broker connection. Reads happen on a background goroutine;
// Next returns frames in arrival order.
type Conn struct {
	ws      *websocket.Conn
	frames  chan Frame
	done    chan struct{}
	untyped atomic.Bool // frames read from now on are not decoded for their Type

	mu  sync.Mutex
	err error
}

// DialOptions tune Dial.
type DialOptions struct {
	Header     http.Header
	HTTPClient *http.Client
	// ReadLimit bounds an incoming frame; default 1 MiB.
	ReadLimit int64
	// Buffer is how many received frames may wait for Next; default 4096.
	Buffer int
}

// Dial opens a WebSocket to url (ws://host:port/ws).
func Dial(ctx context.Context, url string, o *DialOptions) (*Conn, error) {
	if o == nil {
		o = &DialOptions{}
	}
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: o.Header, HTTPClient: o.HTTPClient})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, &HandshakeError{URL: url, Status: resp.StatusCode, RetryAfter: retryAfter(resp.Header.Get("Retry-After")), Err: err}
		}
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	limit := o.ReadLimit
	if limit == 0 {
		limit = 1 << 20
	}
	ws.SetReadLimit(limit)
	buf := o.Buffer
	if buf == 0 {
		buf = 4096
	}
	c := &Conn{ws: ws, frames: make(chan Frame, buf), done: make(chan struct{})}
	go c.readLoop()
	return c, nil
}

func (c *Conn) readLoop() {
	defer close(c.done)
	defer close(c.frames)
	for {
		_, data, err := c.ws.Read(context.Background())
		if err != nil {
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				err = &CloseError{Code: int(ce.Code), Reason: ce.Reason}
			} else {
				err = fmt.Errorf("%w: %v", ErrClosed, err)
			}
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		f := Frame{Raw: data}
		if !c.untyped.Load() {
			env, _ := protocol.DecodeEnvelope(data)
			f.Type = env.Type
		}
		c.frames <- f
	}
}

// Err is why the connection ended (a *CloseError when the broker closed
// it), or nil while it is open.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the connection has ended and all frames were read.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Next returns the next frame. After the connection ends it returns the
// close error once the buffered frames are consumed.
func (c *Conn) Next(ctx context.Context) (Frame, error) {
	select {
	case f, ok := <-c.frames:
		if !ok {
			if err := c.Err(); err != nil {
				return Frame{}, err
			}
			return Frame{}, ErrClosed
		}
		return f, nil
	case <-ctx.Done():
		return Frame{}, ctx.Err()
	}
}

// Untyped stops decoding frames for their Type: frames read after it
// have an empty Type, for a reader that parses each frame in full anyway
// (the load generator, which would otherwise parse every push twice).
// Frames already waiting keep theirs.
func (c *Conn) Untyped() { c.untyped.Store(true) }

// Frames exposes the frame channel (closed when the connection ends).
func (c *Conn) Frames() <-chan Frame { return c.frames }

// WriteJSON sends v as a text frame.
func (c *Conn) WriteJSON(ctx context.Context, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.WriteRaw(ctx, data)
}

// WriteRaw sends data as one text frame.
func (c *Conn) WriteRaw(ctx context.Context, data []byte) error {
	return c.ws.Write(ctx, websocket.MessageText, data)
}

// Close closes the connection normally.
func (c *Conn) Close() error { return c.ws.Close(websocket.StatusNormalClosure, "") }

// CloseNow drops the connection without a close handshake.
func (c *Conn) CloseNow() error { return c.ws.CloseNow() }

// Ping sends a WebSocket ping and waits for the pong.
func (c *Conn) Ping(ctx context.Context) error { return c.ws.Ping(ctx) }

// HelloOptions are the optional hello fields.
type HelloOptions struct {
	SessionID    string
	PID          int64
	Cwd          string
	Hostname     string
	Groups       []string
	Capabilities []string
	Timestamp    time.Time // zero: now
}

// lastHello holds, per identity, the timestamp of this process's latest
// hello (bounded: cleared when it holds too many).
var lastHello = struct {
	sync.Mutex
	ms map[string]int64
}{ms: map[string]int64{}}

// helloMillis is now in milliseconds, but after the identity's previous
// hello: the signature covers only the ids and the timestamp, so two hellos
// of one identity in the same millisecond would carry the same signature,
// and the broker refuses the second as a replay. Only an identity that says
// hello more than once a millisecond moves ahead of the clock.
func helloMillis(id Identity) int64 {
	key := id.MeshID + "|" + id.MemberID
	lastHello.Lock()
	defer lastHello.Unlock()
	ms := max(time.Now().UnixMilli(), lastHello.ms[key]+1)
	if len(lastHello.ms) >= 4096 {
		clear(lastHello.ms)
	}
	lastHello.ms[key] = ms
	return ms
}

// NewHello builds a signed hello frame.
func NewHello(id Identity, o HelloOptions) protocol.Hello {
	var ms int64
	if o.Timestamp.IsZero() {
		ms = helloMillis(id)
	} else {
		ms = o.Timestamp.UnixMilli()
	}
	pub := id.Pubkey()
	h := protocol.Hello{
		Type: protocol.TypeHello, MeshID: id.MeshID, MemberID: id.MemberID, Pubkey: pub,
		SessionID: o.SessionID, PID: o.PID, Cwd: o.Cwd, Hostname: o.Hostname,
		Timestamp: json.Number(fmt.Sprint(ms)), Capabilities: o.Capabilities,
		Signature: auth.SignHello(id.Priv, id.MeshID, id.MemberID, pub, ms),
	}
	if h.SessionID == "" {
		h.SessionID = "go-" + fmt.Sprint(time.Now().UnixNano())
	}
	if h.Cwd == "" {
		h.Cwd = "/"
	}
	for _, g := range o.Groups {
		h.Groups = append(h.Groups, protocol.Group{Name: g})
	}
	return h
}

// HelloError is a rejected hello.
type HelloError struct {
	Code    string
	Message string
	Close   *CloseError
}

func (e *HelloError) Error() string { return "hello rejected: " + e.Code }

// Hello sends a signed hello and waits for hello_ack. A rejection returns
// a *HelloError. Frames other than hello_ack that arrive first are kept for
// Next (a client may pipeline sends after its hello).
func (c *Conn) Hello(ctx context.Context, id Identity, o HelloOptions) (*protocol.HelloAck, error) {
	if err := c.WriteJSON(ctx, NewHello(id, o)); err != nil {
		return nil, err
	}
	return c.WaitHelloAck(ctx)
}

// WaitHelloAck waits for the answer to a hello already sent.
func (c *Conn) WaitHelloAck(ctx context.Context) (*protocol.HelloAck, error) {
	f, err := c.Next(ctx)
	if err != nil {
		return nil, err
	}
	switch f.Type {
	case protocol.TypeHelloAck:
		var ack protocol.HelloAck
		if err := f.Decode(&ack); err != nil {
			return nil, err
		}
		return &ack, nil
	case protocol.TypeError:
		var e protocol.ErrorFrame
		_ = f.Decode(&e)
		he := &HelloError{Code: e.Code, Message: e.Message}
		select {
		case <-c.done:
		case <-ctx.Done():
		}
		var ce *CloseError
		if errors.As(c.Err(), &ce) {
			he.Close = ce
		}
		return nil, he
	}
	return nil, fmt.Errorf("unexpected %q before hello_ack", f.Type)
}
