package claudecode

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A user's settings with hooks of their own in the events claudemesh uses,
// a group that mixes their command with an old claudemesh one, and other
// MCP servers.
const busySettings = `{
  "model": "opus",
  "hooks": {
    "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}],
    "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "audit-bash"}, {"type": "command", "command": "/old/claudemesh hook", "timeout": 10}]}],
    "Notification": [{"hooks": [{"type": "command", "command": "say ping"}]}]
  }
}`

const busyClaudeJSON = `{"numStartups": 7, "mcpServers": {"github": {"type": "stdio", "command": "gh-mcp", "args": []}}}`

func apply(t *testing.T, c *Change, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(time.Now()); err != nil {
		t.Fatal(err)
	}
}

func commands(t *testing.T, path string) map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var s struct{ Hooks map[string][]hookGroup }
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for ev, gs := range s.Hooks {
		for _, g := range gs {
			for _, h := range g.Hooks {
				out[ev] = append(out[ev], h.Command)
			}
		}
	}
	return out
}

// install without --force keeps a claudemesh hook of another path; with
// --force every claudemesh hook moves to the new path, in the same groups'
// company; uninstall removes exactly the claudemesh entries (and what was
// left empty), twice in a row changes nothing, and the user's own hooks,
// settings and MCP servers come out as they went in.
func TestInstallForceAndUninstall(t *testing.T) {
	dir := t.TempDir()
	settings, claudeJSON := filepath.Join(dir, "settings.json"), filepath.Join(dir, ".claude.json")
	if err := os.WriteFile(settings, []byte(busySettings), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(claudeJSON, []byte(busyClaudeJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	const line = "/usr/local/bin/claudemesh hook"
	c, err := PlanHooks(settings, line, false)
	apply(t, c, err)
	got := commands(t, settings)
	if strings.Join(got["PreToolUse"], "|") != "audit-bash|/old/claudemesh hook" {
		t.Fatalf("without --force the old claudemesh hook must stay: %v", got["PreToolUse"])
	}
	if !strings.Contains(strings.Join(c.Notes, "\n"), "--force") {
		t.Fatalf("notes do not mention --force: %v", c.Notes)
	}
	c, err = PlanHooks(settings, line, true)
	apply(t, c, err)
	got = commands(t, settings)
	if strings.Join(got["PreToolUse"], "|") != "audit-bash|"+line {
		t.Fatalf("--force: PreToolUse %v", got["PreToolUse"])
	}
	for _, ev := range InstalledEvents {
		n := 0
		for _, cmd := range got[ev] {
			if IsClaudemeshHook(cmd) {
				n++
				if cmd != line {
					t.Fatalf("%s runs %q", ev, cmd)
				}
			}
		}
		if n != 1 {
			t.Fatalf("%s has %d claudemesh hooks: %v", ev, n, got[ev])
		}
	}
	if again, err := PlanHooks(settings, line, true); err != nil || again.Changed {
		t.Fatalf("second forced install changed: %+v %v", again, err)
	}
	srv := MCPServer{Type: "stdio", Command: "/usr/local/bin/claudemesh", Args: []string{"mcp"}}
	c, err = PlanMCP(claudeJSON, "claudemesh", srv, false)
	apply(t, c, err)

	// Uninstall, twice.
	c, err = PlanUnhooks(settings)
	apply(t, c, err)
	c, err = PlanUnMCP(claudeJSON, "claudemesh")
	apply(t, c, err)
	if c, err := PlanUnhooks(settings); err != nil || c.Changed {
		t.Fatalf("second uninstall changed the hooks: %+v %v", c, err)
	}
	if c, err := PlanUnMCP(claudeJSON, "claudemesh"); err != nil || c.Changed {
		t.Fatalf("second uninstall changed the MCP servers: %+v %v", c, err)
	}
	got = commands(t, settings)
	want := map[string][]string{"Stop": {"notify-send done"}, "PreToolUse": {"audit-bash"}, "Notification": {"say ping"}}
	if len(got) != len(want) {
		t.Fatalf("events after uninstall: %v", got)
	}
	for ev, cmds := range want {
		if strings.Join(got[ev], "|") != strings.Join(cmds, "|") {
			t.Fatalf("%s after uninstall: %v, want %v", ev, got[ev], cmds)
		}
	}
	var before, after map[string]any
	_ = json.Unmarshal([]byte(busySettings), &before)
	data, _ := os.ReadFile(settings)
	_ = json.Unmarshal(data, &after)
	// The mixed group lost only the claudemesh entry; its matcher stayed.
	pre := after["hooks"].(map[string]any)["PreToolUse"].([]any)[0].(map[string]any)
	if pre["matcher"] != "Bash" || after["model"] != "opus" {
		t.Fatalf("settings after uninstall: %s", data)
	}
	data, _ = os.ReadFile(claudeJSON)
	var cj map[string]any
	_ = json.Unmarshal(data, &cj)
	if cj["numStartups"] != float64(7) || len(cj["mcpServers"].(map[string]any)) != 1 || cj["mcpServers"].(map[string]any)["github"] == nil {
		t.Fatalf(".claude.json after uninstall: %s", data)
	}
	// Backups of every version are kept.
	backups, _ := filepath.Glob(filepath.Join(dir, "*.claudemesh-backup-*"))
	if len(backups) == 0 {
		t.Fatal("no backups kept")
	}
}

// A file install created is removed to nothing but what was there: a
// settings file that had no hooks loses the "hooks" key again, and an
// MCP registration of another program under the name is not touched.
func TestUninstallLeavesNoTrace(t *testing.T) {
	dir := t.TempDir()
	settings, claudeJSON := filepath.Join(dir, "settings.json"), filepath.Join(dir, ".claude.json")
	orig := `{"theme": "dark"}`
	_ = os.WriteFile(settings, []byte(orig), 0o600)
	c, err := PlanHooks(settings, "claudemesh hook", false)
	apply(t, c, err)
	c, err = PlanUnhooks(settings)
	apply(t, c, err)
	data, _ := os.ReadFile(settings)
	var o map[string]any
	if err := json.Unmarshal(data, &o); err != nil || len(o) != 1 || o["theme"] != "dark" {
		t.Fatalf("after install and uninstall: %s", data)
	}
	_ = os.WriteFile(claudeJSON, []byte(`{"mcpServers": {"claudemesh": {"type": "stdio", "command": "/opt/other-tool", "args": ["serve"]}}}`), 0o600)
	if c, err := PlanUnMCP(claudeJSON, "claudemesh"); err != nil || c.Changed {
		t.Fatalf("another program's registration removed: %+v %v", c, err)
	}
	if c, err := PlanUnhooks(filepath.Join(dir, "missing.json")); err != nil || c.Changed {
		t.Fatalf("missing file: %+v %v", c, err)
	}
}

func TestTemporaryBuild(t *testing.T) {
	for path, want := range map[string]bool{
		"/tmp/go-build1234567/b001/exe/claudemesh":         true,
		"/var/folders/x/T/go-build987/b001/exe/claudemesh": true,
		"/home/u/go/bin/claudemesh":                        false,
		"/usr/local/bin/claudemesh":                        false,
		"/home/u/src/go-builder/claudemesh":                false,
		"/tmp/go-build":                                    false,
	} {
		if TemporaryBuild(path) != want {
			t.Errorf("TemporaryBuild(%q) = %v", path, !want)
		}
	}
}
