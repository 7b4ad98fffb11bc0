package claudecode

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestStatusForEvent(t *testing.T) {
	for ev, want := range map[string]string{
		"SessionStart": "idle", "UserPromptSubmit": "working", "PreToolUse": "working",
		"PostToolUse": "working", "Stop": "idle", "SubagentStop": "working", "SessionEnd": "idle",
		"PreCompact": "working", "Notification": "", "Bogus": "",
	} {
		got, ok := StatusForEvent(ev)
		if got != want || ok != (want != "") {
			t.Errorf("%s: %q %v, want %q", ev, got, ok, want)
		}
	}
	for _, ev := range InstalledEvents {
		if _, ok := StatusForEvent(ev); !ok {
			t.Errorf("installed event %s has no status", ev)
		}
	}
}

func TestParseHookInput(t *testing.T) {
	in, err := ParseHookInput(strings.NewReader(`{"session_id":"abc","transcript_path":"/t.jsonl","cwd":"/p","hook_event_name":"PreToolUse","tool_name":"Bash","tool_input":{"command":"ls"}}`))
	if err != nil || in.Event != "PreToolUse" || in.Cwd != "/p" || in.SessionID != "abc" || in.ToolName != "Bash" {
		t.Fatalf("%+v %v", in, err)
	}
	for _, bad := range []string{"", "[]", "not json", `{"cwd":"/p"}`} {
		if _, err := ParseHookInput(strings.NewReader(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

const userSettings = `{
  "model": "opus",
  "permissions": {"allow": ["Bash(go test:*)"]},
  "hooks": {
    "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]
  },
  "zzz": 1
}`

// Hooks are added to every event without touching other settings or other
// hooks; a second run changes nothing.
func TestPlanHooksMerges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "settings.json")
	if err := os.WriteFile(path, []byte(userSettings), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := PlanHooks(path, "claudemesh hook", false)
	if err != nil || !c.Changed {
		t.Fatalf("%+v %v", c, err)
	}
	backup, err := c.Apply(time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(backup); string(b) != userSettings {
		t.Fatalf("backup %q", b)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("mode changed to %v", fi.Mode().Perm())
	}
	var got struct {
		Model       string
		Permissions map[string][]string
		Zzz         int
		Hooks       map[string][]hookGroup
	}
	data, _ := os.ReadFile(path)
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if got.Model != "opus" || got.Zzz != 1 || got.Permissions["allow"][0] != "Bash(go test:*)" {
		t.Fatalf("other settings lost: %s", data)
	}
	if len(got.Hooks["Stop"]) != 2 || got.Hooks["Stop"][0].Hooks[0].Command != "notify-send done" {
		t.Fatalf("existing Stop hook lost: %+v", got.Hooks["Stop"])
	}
	for _, ev := range InstalledEvents {
		gs := got.Hooks[ev]
		if len(gs) == 0 || gs[len(gs)-1].Hooks[0].Command != "claudemesh hook" {
			t.Errorf("%s: %+v", ev, gs)
		}
	}
	if got.Hooks["PreToolUse"][0].Matcher != "*" {
		t.Errorf("PreToolUse matcher %q", got.Hooks["PreToolUse"][0].Matcher)
	}
	// Key order is kept.
	s := string(data)
	if !(strings.Index(s, `"model"`) < strings.Index(s, `"permissions"`) && strings.Index(s, `"hooks"`) < strings.Index(s, `"zzz"`)) {
		t.Errorf("keys reordered:\n%s", s)
	}
	again, err := PlanHooks(path, "/other/path/claudemesh hook", false)
	if err != nil || again.Changed {
		t.Fatalf("second plan changed: %+v %v", again, err)
	}
	if !HooksInstalled(filepath.Join(t.TempDir(), "missing.json"), path) {
		t.Error("HooksInstalled = false")
	}
	if HooksInstalled(backup) {
		t.Error("HooksInstalled true for settings without claudemesh")
	}
}

func TestPlanMCP(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, ".claude.json")
	// A missing file is created without a backup.
	srv := MCPServer{Type: "stdio", Command: "/usr/bin/claudemesh", Args: []string{"mcp"}}
	c, err := PlanMCP(path, "claudemesh", srv, false)
	if err != nil || !c.Changed || c.Before != nil {
		t.Fatalf("%+v %v", c, err)
	}
	if b, err := c.Apply(time.Now()); err != nil || b != "" {
		t.Fatalf("apply: %q %v", b, err)
	}
	// Add unrelated state, as Claude Code keeps there.
	data, _ := os.ReadFile(path)
	var o map[string]any
	_ = json.Unmarshal(data, &o)
	o["numStartups"] = 42
	o["mcpServers"].(map[string]any)["other"] = map[string]any{"command": "x"}
	data, _ = json.Marshal(o)
	_ = os.WriteFile(path, data, 0o600)

	same, err := PlanMCP(path, "claudemesh", srv, false)
	if err != nil || same.Changed {
		t.Fatalf("same registration changed: %+v %v", same, err)
	}
	diff := srv
	diff.Command = "/opt/claudemesh"
	kept, err := PlanMCP(path, "claudemesh", diff, false)
	if err != nil || kept.Changed || !strings.Contains(strings.Join(kept.Notes, ""), "--force") {
		t.Fatalf("different registration replaced without force: %+v %v", kept, err)
	}
	forced, err := PlanMCP(path, "claudemesh", diff, true)
	if err != nil || !forced.Changed {
		t.Fatalf("forced: %+v %v", forced, err)
	}
	if _, err := forced.Apply(time.Now()); err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(path)
	var got struct {
		NumStartups int
		McpServers  map[string]MCPServer
	}
	_ = json.Unmarshal(data, &got)
	if got.NumStartups != 42 || got.McpServers["other"].Command != "x" || got.McpServers["claudemesh"].Command != "/opt/claudemesh" {
		t.Fatalf("%s", data)
	}
}

func TestPlanRejectsBrokenFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "settings.json")
	_ = os.WriteFile(path, []byte(`{"hooks": [}`), 0o600)
	if _, err := PlanHooks(path, "claudemesh hook", false); err == nil {
		t.Fatal("broken settings accepted")
	}
	_ = os.WriteFile(path, []byte(`{"hooks": {"Stop": {"not": "a list"}}}`), 0o600)
	if _, err := PlanHooks(path, "claudemesh hook", false); err == nil {
		t.Fatal("hooks.Stop object accepted")
	}
}

func TestIsClaudemeshHook(t *testing.T) {
	for cmd, want := range map[string]bool{
		"claudemesh hook": true, "/home/u/go/bin/claudemesh hook": true,
		"claudemesh --config-dir '/tmp/x' hook": true, "claudemesh mcp": false, "notify hook": false, "": false,
	} {
		if IsClaudemeshHook(cmd) != want {
			t.Errorf("%q: %v", cmd, !want)
		}
	}
	if ShellQuote("/usr/bin/claudemesh") != "/usr/bin/claudemesh" || ShellQuote("/a b/it's") != `'/a b/it'\''s'` {
		t.Error("ShellQuote")
	}
}

// The session pid skips shells between this process and Claude Code.
func TestSessionPID(t *testing.T) {
	if runtime.GOOS != "linux" {
		pid, certain := sessionPID("/nonexistent", 42)
		if pid != 42 || certain {
			t.Fatalf("%d %v", pid, certain)
		}
		return
	}
	root := t.TempDir()
	proc := func(pid int, comm string, ppid int) {
		dir := filepath.Join(root, strconv.Itoa(pid))
		_ = os.MkdirAll(dir, 0o755)
		_ = os.WriteFile(filepath.Join(dir, "stat"), []byte(strconv.Itoa(pid)+" ("+comm+") S "+strconv.Itoa(ppid)+" 1 1 0 -1"), 0o644)
	}
	proc(100, "claude", 1)
	proc(200, "bash", 100)
	proc(300, "sh", 200)
	proc(400, "weird) (name", 300)
	if pid, ok := sessionPID(root, 300); pid != 100 || !ok {
		t.Errorf("through shells: %d %v", pid, ok)
	}
	if pid, ok := sessionPID(root, 100); pid != 100 || !ok {
		t.Errorf("direct: %d %v", pid, ok)
	}
	if pid, ok := sessionPID(root, 400); pid != 400 || !ok {
		t.Errorf("odd comm: %d %v", pid, ok)
	}
	if pid, ok := sessionPID(root, 999); pid != 999 || ok {
		t.Errorf("missing: %d %v", pid, ok)
	}
	if pid, _ := SessionPID(); pid <= 0 {
		t.Errorf("SessionPID = %d", pid)
	}
}

// An install and an uninstall in the same second each keep a backup: the
// second never overwrites the first, which holds the user's original
// settings. And a settings file that is a symbolic link (a dotfiles
// repository) stays a link, its target edited.
func TestApplyKeepsEveryBackupAndLinks(t *testing.T) {
	home, dotfiles := t.TempDir(), t.TempDir()
	target := filepath.Join(dotfiles, "settings.json")
	if err := os.WriteFile(target, []byte(userSettings), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(home, "settings.json")
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	c, err := PlanHooks(path, "claudemesh hook", false)
	if err != nil {
		t.Fatal(err)
	}
	first, err := c.Apply(now)
	if err != nil {
		t.Fatal(err)
	}
	installed, _ := os.ReadFile(target)
	c, err = PlanUnhooks(path)
	if err != nil {
		t.Fatal(err)
	}
	second, err := c.Apply(now)
	if err != nil {
		t.Fatal(err)
	}
	if first == second {
		t.Fatalf("both backups are %s", first)
	}
	if b, _ := os.ReadFile(first); string(b) != userSettings {
		t.Fatalf("the first backup no longer holds the original settings:\n%s", b)
	}
	if b, _ := os.ReadFile(second); string(b) != string(installed) {
		t.Fatalf("the second backup is not the installed version:\n%s", b)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the settings link was replaced by a file: %v %v", fi, err)
	}
	if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o644 {
		t.Errorf("target mode changed to %v", fi.Mode().Perm())
	}
	if HooksInstalled(target) {
		t.Error("the uninstall did not reach the link's target")
	}
}
