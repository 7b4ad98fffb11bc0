//go:build !unix

package peer

import "io/fs"

// fileOwner is unknown where files have no Unix owner.
func fileOwner(fs.FileInfo) (int, bool) { return 0, false }
