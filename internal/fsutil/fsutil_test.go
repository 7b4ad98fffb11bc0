package fsutil_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/claudemesh/broker/internal/fsutil"
)

// leftovers lists the files of dir other than keep: a temporary file left
// behind would show up here.
func leftovers(t *testing.T, dir string, keep ...string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
next:
	for _, e := range entries {
		for _, k := range keep {
			if e.Name() == k {
				continue next
			}
		}
		out = append(out, e.Name())
	}
	return out
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// The file gets exactly the mode asked for, whatever the umask and
// whatever mode the file it replaces had, and nothing else stays in the
// folder.
func TestWriteFileAtomicMode(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "settings.json")

	if err := fsutil.WriteFileAtomic(path, []byte("one"), 0o644); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, path); m != 0o644 {
		t.Fatalf("new file: mode %v, want 0644 (the umask 077 must not narrow it)", m)
	}
	if err := fsutil.WriteFileAtomic(path, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, path); m != 0o600 {
		t.Fatalf("replaced file: mode %v, want 0600", m)
	}
	if got, _ := os.ReadFile(path); string(got) != "two" {
		t.Fatalf("content %q", got)
	}
	if extra := leftovers(t, dir, "settings.json"); len(extra) > 0 {
		t.Fatalf("left in the folder: %v", extra)
	}
}

// A failed write leaves the old file as it was and no temporary file: the
// rename fails (the path is a non-empty folder), and a missing folder
// creates nothing.
func TestWriteFileAtomicFailureLeavesNoTrace(t *testing.T) {
	dir := t.TempDir()
	busy := filepath.Join(dir, "busy")
	if err := os.MkdirAll(filepath.Join(busy, "inside"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.WriteFileAtomic(busy, []byte("x"), 0o600); err == nil {
		t.Fatal("replacing a non-empty folder succeeded")
	}
	if fi, err := os.Stat(busy); err != nil || !fi.IsDir() {
		t.Fatalf("the folder was changed: %v %v", fi, err)
	}
	if extra := leftovers(t, dir, "busy"); len(extra) > 0 {
		t.Fatalf("left in the folder after a failed rename: %v", extra)
	}

	missing := filepath.Join(dir, "no-such-folder", "f.json")
	if err := fsutil.WriteFileAtomic(missing, []byte("x"), 0o600); err == nil {
		t.Fatal("writing into a missing folder succeeded")
	}
	if _, err := os.Stat(filepath.Dir(missing)); !os.IsNotExist(err) {
		t.Fatalf("the missing folder was created: %v", err)
	}
}

// A settings file that is a symbolic link (a dotfiles repository) stays a
// link; the file it points to gets the content, with the mode asked for,
// and the temporary file lives beside the target (same file system).
func TestWriteFileAtomicFollowsLinks(t *testing.T) {
	home, dotfiles := t.TempDir(), t.TempDir()
	target := filepath.Join(dotfiles, "settings.json")
	if err := os.WriteFile(target, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(home, "settings.json")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.WriteFileAtomic(link, []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(link)
	if err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the link was replaced by a file: %v %v", fi, err)
	}
	if got, _ := os.ReadFile(target); string(got) != "new" {
		t.Fatalf("target holds %q", got)
	}
	if m := mode(t, target); m != 0o644 {
		t.Fatalf("target mode %v", m)
	}
	if extra := leftovers(t, dotfiles, "settings.json"); len(extra) > 0 {
		t.Fatalf("left beside the target: %v", extra)
	}
	if extra := leftovers(t, home, "settings.json"); len(extra) > 0 {
		t.Fatalf("left beside the link: %v", extra)
	}
}

// Readers racing a writer only ever see a whole old or a whole new
// content. os.WriteFile, which truncates and then writes, fails this: a
// reader sees an empty or a partial file.
func TestWriteFileAtomicReadersSeeWholeFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshes.json")
	a := bytes.Repeat([]byte("a"), 64<<10)
	b := bytes.Repeat([]byte("b"), 32<<10)
	if err := fsutil.WriteFileAtomic(path, a, 0o600); err != nil {
		t.Fatal(err)
	}
	const writes, readers = 60, 2
	done := make(chan struct{})
	var wg sync.WaitGroup
	bad := make(chan string, readers)
	for r := 0; r < readers; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				got, err := os.ReadFile(path)
				if err != nil || !(bytes.Equal(got, a) || bytes.Equal(got, b)) {
					bad <- "a reader saw " + describe(got, err)
					return
				}
			}
		}()
	}
	for i := 0; i < writes; i++ {
		data := a
		if i%2 == 0 {
			data = b
		}
		if err := fsutil.WriteFileAtomic(path, data, 0o600); err != nil {
			close(done)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()
	select {
	case msg := <-bad:
		t.Fatal(msg)
	default:
	}
}

func describe(got []byte, err error) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("a file of %d bytes, neither version", len(got))
}

func TestSyncDir(t *testing.T) {
	if err := fsutil.SyncDir(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.SyncDir(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("syncing a missing folder succeeded")
	}
}
