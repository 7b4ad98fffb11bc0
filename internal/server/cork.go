package server

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// corkConn is a session's hijacked connection. coder/websocket flushes
// every frame to it with a write of its own; while the session's write
// loop writes a batch it corks the connection, the frames collect in a
// buffer, and uncork hands them to the kernel in one write (a system
// call per frame was a quarter of a node's CPU in a burst).
type corkConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool
	buf    *[]byte // while corked; from corkBufs
	err    error   // the failed uncork: every later write fails with it
}

// corkFlushBytes is how much a corked connection collects before the write
// loop uncorks it mid-batch.
const corkFlushBytes = 64 << 10

var corkBufs = sync.Pool{New: func() any { b := make([]byte, 0, corkFlushBytes+8<<10); return &b }}

// putCorkBuf gives a buffer back to corkBufs, unless one huge frame grew
// it.
func putCorkBuf(buf *[]byte) {
	*buf = (*buf)[:0]
	if cap(*buf) <= 4*corkFlushBytes {
		corkBufs.Put(buf)
	}
}

// errCorkTimeout is a batch the peer did not take within writeTimeout.
var errCorkTimeout = errors.New("write timed out")

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.corked {
		*c.buf = append(*c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// cork starts collecting writes.
func (c *corkConn) cork() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		c.corked = true
		c.buf = corkBufs.Get().(*[]byte)
	}
}

// buffered is how many bytes wait for uncork.
func (c *corkConn) buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return 0
	}
	return len(*c.buf)
}

// uncork writes what was collected, within timeout, and stops collecting.
// A peer that does not take it in time is a slow consumer (errCorkTimeout).
// The write also ends when ctx does (the session closing: its error is
// ctx's), as coder/websocket's own writes do; the connection then takes no
// more writes.
func (c *corkConn) uncork(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.err
	}
	c.corked = false
	buf := c.buf
	c.buf = nil
	defer putCorkBuf(buf)
	if c.err != nil || len(*buf) == 0 {
		return c.err
	}
	_ = c.Conn.SetWriteDeadline(time.Now().Add(timeout))
	stop := context.AfterFunc(ctx, func() { _ = c.Conn.SetWriteDeadline(time.Now()) })
	_, err := c.Conn.Write(*buf)
	if !stop() {
		// ctx ended: its deadline may land after any reset below, so no
		// write may follow.
		c.err = ctx.Err()
		if err == nil {
			return nil // the batch went out; later writes fail with c.err
		}
		return c.err
	}
	_ = c.Conn.SetWriteDeadline(time.Time{})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = errCorkTimeout
		}
		c.err = err
	}
	return err
}

// discard drops what was collected and stops collecting: the frames failed
// before they reached the kernel, and what the connection writes next (a
// close frame) must not wait behind them.
func (c *corkConn) discard() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return
	}
	c.corked = false
	putCorkBuf(c.buf)
	c.buf = nil
}

// corkingWriter hands websocket.Accept a corkConn when it hijacks the
// connection.
type corkingWriter struct {
	http.ResponseWriter
	conn *corkConn
}

func (w *corkingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.conn = &corkConn{Conn: nc}
	brw.Writer.Reset(w.conn)
	return w.conn, brw, nil
}
