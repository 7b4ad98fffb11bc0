package testkit_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/testkit"
)

// A test needing a program that is absent is skipped, saying what to
// install, outside CI, and fails in CI; a present one is found by name or
// by absolute path.
func TestTool(t *testing.T) {
	if os.Getenv("TESTKIT_TOOL_CHILD") == "1" {
		testkit.Tool(t, "no-such-package", "a test of Tool", "/no/such/tool", "no-such-tool-4f7a")
		t.Log("Tool returned for a missing program")
		return
	}
	if p := testkit.Tool(t, "dash", "a test of Tool", "/no/such/sh", "sh"); filepath.Base(p) != "sh" {
		t.Fatalf("found sh at %q", p)
	}
	sh, _ := exec.LookPath("sh")
	if p := testkit.Tool(t, "dash", "a test of Tool", sh); p != sh {
		t.Fatalf("absolute path: %q", p)
	}
	run := func(ci string) (string, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestTool$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTKIT_TOOL_CHILD=1", "CI="+ci)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("")
	if err != nil || !strings.Contains(out, "--- SKIP") || !strings.Contains(out, "apt-get install no-such-package") ||
		!strings.Contains(out, "skipped outside CI") || strings.Contains(out, "Tool returned") {
		t.Fatalf("outside CI: %v\n%s", err, out)
	}
	out, err = run("true")
	if err == nil || !strings.Contains(out, "--- FAIL") || !strings.Contains(out, "in CI a missing tool fails the test") ||
		strings.Contains(out, "Tool returned") {
		t.Fatalf("in CI: %v\n%s", err, out)
	}
}
