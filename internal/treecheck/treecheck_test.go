// Package treecheck holds the suite's checks of the source tree itself:
// every Go file formatted, go.mod tidy, staticcheck clean (go vet runs in
// scripts/test.sh before the tests). A change that breaks one fails the
// suite like a failing test would.
package treecheck

import (
	"bytes"
	"go/format"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// root is the module's top folder.
func root(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("no go.mod at %s: %v", dir, err)
	}
	return dir
}

func TestGofmt(t *testing.T) {
	top := root(t)
	var bad []string
	err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != top && (strings.HasPrefix(name, ".") || name == "testdata" || name == "node_modules") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		out, err := format.Source(src)
		if err != nil || !bytes.Equal(out, src) {
			rel, _ := filepath.Rel(top, path)
			bad = append(bad, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(bad) > 0 {
		t.Fatalf("gofmt would change: %s", strings.Join(bad, " "))
	}
}

func goCmd(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = root(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func TestGoModTidy(t *testing.T) { goCmd(t, "mod", "tidy", "-diff") }

// staticcheck is pinned as a tool in go.mod (go tool staticcheck).
func TestStaticcheck(t *testing.T) { goCmd(t, "tool", "staticcheck", "./...") }
