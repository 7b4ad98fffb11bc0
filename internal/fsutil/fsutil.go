// Package fsutil holds file-system helpers shared by the claudemesh CLI's
// packages (profile, claudecode).
package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
)

// WriteFileAtomic replaces path with data so that a crash or a concurrent
// reader sees the old content or the new one, never a mix, and so that the
// new content survives a power cut once it returns: the data goes to a
// temporary file in the same folder (a rename is atomic only within one
// file system), which is synced, given exactly perm (umask aside, and
// before any data is in it: a secret key never sits in a wider file),
// renamed over path, and then the folder is synced so that the rename
// itself is on disk. A symbolic link at path is followed, so that a
// settings file kept in a dotfiles repository stays a link and the file it
// points to gets the new content.
//
// On error the temporary file is removed and path is as it was, except
// when only the folder's sync failed: then path has the new content, which
// may not survive a power cut.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	path = followLink(path)
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	renamed := false
	defer func() {
		if !renamed {
			// Not after a rename: by then another writer may have
			// taken the name.
			_ = os.Remove(tmp)
		}
	}()
	if err := write(f, data, perm); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	renamed = true
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("%s was replaced, but its folder could not be synced: %w", path, err)
	}
	return nil
}

// write fills the temporary file and closes it.
func write(f *os.File, data []byte, perm fs.FileMode) error {
	err := f.Chmod(perm.Perm())
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// followLink resolves a symbolic link at path to the file it names; any
// other path (a regular file, no file, a dangling link) is returned as is.
func followLink(path string) string {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		return path
	}
	if target, err := filepath.EvalSymlinks(path); err == nil {
		return target
	}
	return path
}

// SyncDir makes the entries of dir (a file created, renamed or removed in
// it) durable. File systems that cannot sync a folder are not an error,
// nor is Windows, whose renames write through.
func SyncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOTSUP) {
		return nil
	}
	return err
}
