package peer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/fsutil"
)

// SessionInfo describes a running session that accepts control requests;
// it is written to <run dir>/<session id>.json while the session runs.
type SessionInfo struct {
	MeshID    string    `json:"meshId"`
	MeshSlug  string    `json:"meshSlug"`
	SessionID string    `json:"sessionId"`
	Cwd       string    `json:"cwd"`
	PID       int64     `json:"pid"`
	Command   string    `json:"command"` // mcp or listen
	Socket    string    `json:"socket"`
	StartedAt time.Time `json:"startedAt"`
}

// Control request operations.
const (
	OpSetStatus  = "set_status"
	OpSetSummary = "set_summary"
)

// Request is one control request: one JSON line, answered by one line.
type Request struct {
	Op      string `json:"op"`
	Status  string `json:"status,omitempty"`
	Summary string `json:"summary,omitempty"`
}

// Reply answers a Request.
type Reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// maxRequest bounds a control request line.
const maxRequest = 64 << 10

// socketPath picks where the control socket goes: in the run folder, or,
// when that path is too long for a Unix socket (about 104 bytes on macOS),
// in a private folder under the system's temporary directory.
func socketPath(runDir, sessionID string) (string, error) {
	p := filepath.Join(runDir, sessionID+".sock")
	if len(p) < 100 {
		return p, nil
	}
	sum := sha256.Sum256([]byte(p))
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("claudemesh-%d", os.Getuid()))
	if err := privateDir(dir, os.Getuid()); err != nil {
		return "", err
	}
	return filepath.Join(dir, hex.EncodeToString(sum[:8])+".sock"), nil
}

// privateDir makes dir a folder only uid can enter. The temporary
// directory is shared: another user who created the folder first (its name
// is predictable) could watch or replace the sockets in it, and with them
// the status and summary requests. A missing folder is created 0700; an
// existing one must be a real folder (not a link) owned by uid, and is
// tightened to 0700.
func privateDir(dir string, uid int) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a folder (a link or a file someone else put there?); remove it and try again", dir)
	}
	if owner, ok := fileOwner(fi); ok && owner != uid {
		return fmt.Errorf("%s belongs to another user (uid %d); refusing to keep control sockets there: remove it, or use a shorter claudemesh folder path (--config-dir)", dir, owner)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("make %s private: %w", dir, err)
		}
	}
	return nil
}

// ServeControl listens on a Unix socket (reachable only by this user: the
// folder is 0700) for status and summary changes, and registers the
// session in runDir. It returns a function that stops serving and removes
// the registration.
func (s *Session) ServeControl(runDir, command string) (stop func(), err error) {
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, err
	}
	if err := privateDir(runDir, os.Getuid()); err != nil {
		return nil, err
	}
	sid := s.c.SessionID()
	sock, err := socketPath(runDir, sid)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	_ = os.Chmod(sock, 0o600)
	info := SessionInfo{MeshID: s.cfg.Mesh.MeshID, MeshSlug: s.cfg.Mesh.Slug, SessionID: sid, Cwd: s.cfg.Cwd,
		PID: int64(os.Getpid()), Command: command, Socket: sock, StartedAt: time.Now().UTC()}
	reg := filepath.Join(runDir, sid+".json")
	data, _ := json.Marshal(info)
	if err := fsutil.WriteFileAtomic(reg, data, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.serveControl(ctx, conn)
			}()
		}
	}()
	return func() {
		cancel()
		ln.Close()
		wg.Wait()
		os.Remove(reg)
		os.Remove(sock)
	}, nil
}

func (s *Session) serveControl(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(&limitedReader{r: conn, n: maxRequest})
	line, err := r.ReadBytes('\n')
	if err != nil && len(line) == 0 {
		return
	}
	var req Request
	reply := Reply{OK: true}
	if err := json.Unmarshal(line, &req); err != nil {
		reply = Reply{Error: "malformed request"}
	} else if err := s.apply(ctx, req); err != nil {
		reply = Reply{Error: err.Error()}
	}
	data, _ := json.Marshal(reply)
	_, _ = conn.Write(append(data, '\n'))
}

func (s *Session) apply(ctx context.Context, req Request) error {
	switch req.Op {
	case OpSetStatus:
		return s.SetStatus(ctx, req.Status)
	case OpSetSummary:
		return s.SetSummary(ctx, req.Summary)
	}
	return fmt.Errorf("unknown operation %q", req.Op)
}

type limitedReader struct {
	r interface{ Read([]byte) (int, error) }
	n int
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("request too long")
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= n
	return n, err
}

// Sessions lists the registered sessions in runDir, oldest first. A
// registration whose socket no longer answers (its process died) is
// removed.
func Sessions(runDir string) ([]SessionInfo, error) {
	files, err := filepath.Glob(filepath.Join(runDir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []SessionInfo
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var info SessionInfo
		if json.Unmarshal(data, &info) != nil || info.Socket == "" {
			continue
		}
		conn, err := net.DialTimeout("unix", info.Socket, time.Second)
		if err != nil {
			if !errors.Is(err, os.ErrPermission) {
				os.Remove(f)
				os.Remove(info.Socket)
			}
			continue
		}
		conn.Close()
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].StartedAt.Before(out[j].StartedAt) })
	return out, nil
}

// Send delivers a control request to a running session.
func Send(ctx context.Context, info SessionInfo, req Request) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", info.Socket)
	if err != nil {
		return fmt.Errorf("session %s is not answering: %w", info.SessionID, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	}
	data, _ := json.Marshal(req)
	if _, err := conn.Write(append(data, '\n')); err != nil {
		return err
	}
	line, err := bufio.NewReader(&limitedReader{r: conn, n: maxRequest}).ReadBytes('\n')
	if err != nil && len(line) == 0 {
		return fmt.Errorf("session %s: %w", info.SessionID, err)
	}
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil {
		return fmt.Errorf("session %s: malformed reply", info.SessionID)
	}
	if !r.OK {
		return errors.New(strings.TrimSpace(r.Error))
	}
	return nil
}
