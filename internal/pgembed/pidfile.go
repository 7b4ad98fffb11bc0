package pgembed

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// pidFile is what recoverPIDFile needs from postmaster.pid: its first line
// is the postmaster's PID, its fourth the port.
type pidFile struct {
	pid  int
	port int
}

func readPIDFile(path string) (pidFile, bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return pidFile{}, false, nil
	}
	if err != nil {
		return pidFile{}, false, fmt.Errorf("pgembed: read %s: %w", path, err)
	}
	lines := strings.Split(string(data), "\n")
	var pf pidFile
	pf.pid, _ = strconv.Atoi(strings.TrimSpace(lines[0]))
	if len(lines) > 3 {
		pf.port, _ = strconv.Atoi(strings.TrimSpace(lines[3]))
	}
	return pf, true, nil
}

// recoverPIDFile deals with a postmaster.pid left in the folder, which
// makes Postgres refuse to start when its PID belongs to any live process:
//   - the server of an earlier run still running (its broker was killed,
//     or lost its terminal) is stopped;
//   - a file whose PID is dead, or now belongs to another program (PIDs are
//     reused, quickly in containers), is removed.
//
// Each case is explained in one line. The caller must make sure no other
// live user of the folder exists (broker dev holds a lock for this).
func (s *Server) recoverPIDFile(ctx context.Context) error {
	path := filepath.Join(s.opts.DataDir, "postmaster.pid")
	pf, ok, err := readPIDFile(path)
	if err != nil || !ok {
		return err
	}
	switch s.holder(ctx, pf) {
	case holderServer:
		s.notify(fmt.Sprintf("postgres: a server left running by an earlier run (PID %d, port %d) holds %s; stopping it", pf.pid, pf.port, s.opts.DataDir))
		if err := s.Stop(); err != nil {
			return err
		}
		// pg_ctl stop waits for the server to remove the file.
		if _, still, _ := readPIDFile(path); still {
			return fmt.Errorf("pgembed: the server of an earlier run (PID %d) did not stop; stop it, then start again", pf.pid)
		}
		return nil
	case holderUnknown:
		return fmt.Errorf("pgembed: %s names PID %d, which is running; if it is not a PostgreSQL server of this folder, delete the file and start again", path, pf.pid)
	}
	why := "is not running"
	if pf.pid > 0 && processAlive(pf.pid) {
		why = "now belongs to another program"
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("pgembed: remove stale %s: %w", path, err)
	}
	s.notify(fmt.Sprintf("postgres: removed a stale postmaster.pid (PID %d %s; the earlier run ended without stopping its server)", pf.pid, why))
	return nil
}

type holderKind int

const (
	holderNone    holderKind = iota // nobody: the file is stale
	holderServer                    // a live Postgres server of this folder
	holderUnknown                   // a live process that could not be identified
)

// holder tells who holds the folder according to pf. On Linux a
// postmaster's working directory is its data folder, which identifies it
// without a doubt; elsewhere a server answering on the file's port with
// this data_directory does.
func (s *Server) holder(ctx context.Context, pf pidFile) holderKind {
	if pf.pid <= 0 || !processAlive(pf.pid) {
		return holderNone
	}
	if cwd, err := os.Readlink("/proc/" + strconv.Itoa(pf.pid) + "/cwd"); err == nil {
		if sameDir(cwd, s.opts.DataDir) {
			return holderServer
		}
		return holderNone
	} else if _, err := os.Stat("/proc/self/cwd"); err == nil {
		// /proc works but not for this PID: another user's process, and
		// the server always runs as us (or as postgres, which root reads).
		return holderNone
	}
	if pf.port > 0 {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=3", pf.port)
		if conn, err := pgx.Connect(cctx, url); err == nil {
			defer conn.Close(context.Background())
			var dir string
			if conn.QueryRow(cctx, "SHOW data_directory").Scan(&dir) == nil && sameDir(dir, s.opts.DataDir) {
				return holderServer
			}
		}
	}
	return holderUnknown
}

// processAlive reports whether pid exists (EPERM: it does, owned by
// another user).
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

func sameDir(a, b string) bool {
	if ra, err := filepath.EvalSymlinks(a); err == nil {
		a = ra
	}
	if rb, err := filepath.EvalSymlinks(b); err == nil {
		b = rb
	}
	return filepath.Clean(a) == filepath.Clean(b)
}
