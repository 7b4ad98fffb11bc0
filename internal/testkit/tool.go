package testkit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// Tool finds a program a test runs for real (chromium, haproxy, promtool):
// each candidate is an absolute path or a name looked up on PATH. When none
// is found the test fails in CI (CI=true, as CI services set it), where a
// missing tool is a broken setup; elsewhere it is skipped with the package
// to install. scripts/test.sh names the missing packages before and after
// the run, so such a skip is never silent.
func Tool(t testing.TB, pkg, why string, candidates ...string) string {
	t.Helper()
	for _, c := range candidates {
		if filepath.IsAbs(c) {
			if fi, err := os.Stat(c); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
				return c
			}
			continue
		}
		if p, err := exec.LookPath(c); err == nil {
			return p
		}
	}
	msg := candidates[0] + " is not installed (" + why + "): install the Debian package " + pkg +
		" (sudo apt-get install " + pkg + "); scripts/test.sh installs it when run as root"
	if InCI() {
		t.Fatal(msg + "; in CI a missing tool fails the test")
	}
	t.Skip(msg + "; skipped outside CI")
	return ""
}

// InCI reports whether the tests run in CI (CI set to a true value).
func InCI() bool {
	v, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && v
}
