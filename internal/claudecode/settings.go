package claudecode

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/fsutil"
)

// object is a JSON object that keeps its keys in file order and its values
// byte for byte, so that editing one key leaves the rest of a user's
// settings as they were (only re-indented).
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

func newObject() *object { return &object{vals: map[string]json.RawMessage{}} }

func (o *object) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return errors.New("not a JSON object")
	}
	o.keys, o.vals = nil, map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return err
		}
		if _, dup := o.vals[key]; !dup {
			o.keys = append(o.keys, key)
		}
		o.vals[key] = v
	}
	_, err = dec.Token()
	return err
}

func (o *object) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		b.Write(o.vals[k])
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (o *object) get(key string) (json.RawMessage, bool) {
	v, ok := o.vals[key]
	return v, ok
}

func (o *object) set(key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, ok := o.vals[key]; !ok {
		o.keys = append(o.keys, key)
	}
	o.vals[key] = data
	return nil
}

func (o *object) remove(key string) {
	if _, ok := o.vals[key]; !ok {
		return
	}
	delete(o.vals, key)
	o.keys = slices.DeleteFunc(o.keys, func(k string) bool { return k == key })
}

// child returns the object under key (a new one when absent).
func (o *object) child(key string) (*object, error) {
	raw, ok := o.get(key)
	c := newObject()
	if !ok || string(raw) == "null" {
		return c, nil
	}
	if err := json.Unmarshal(raw, c); err != nil {
		return nil, fmt.Errorf("%q is not a JSON object: %w", key, err)
	}
	return c, nil
}

// Change is a planned edit of one settings file.
type Change struct {
	Path    string
	Before  []byte // nil when the file does not exist
	After   []byte
	Notes   []string // what was added, or kept and why
	Changed bool
	mode    os.FileMode
}

// readObject loads a JSON settings file; a missing file is an empty object.
func readObject(path string) (*object, []byte, os.FileMode, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return newObject(), nil, 0o600, nil
	}
	if err != nil {
		return nil, nil, 0, err
	}
	mode := os.FileMode(0o600)
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	o := newObject()
	if len(bytes.TrimSpace(data)) == 0 {
		return o, data, mode, nil
	}
	if err := json.Unmarshal(data, o); err != nil {
		return nil, nil, 0, fmt.Errorf("%s is not a JSON object (fix or move it, then run install again): %w", path, err)
	}
	return o, data, mode, nil
}

func finish(path string, o *object, before []byte, mode os.FileMode, notes []string, changed bool) (*Change, error) {
	after, err := json.MarshalIndent(o, "", "  ")
	if err != nil {
		return nil, err
	}
	return &Change{Path: path, Before: before, After: append(after, '\n'), Notes: notes, Changed: changed, mode: mode}, nil
}

// hookGroup is one matcher entry of a hook event in settings.json.
type hookGroup struct {
	Matcher string        `json:"matcher,omitempty"`
	Hooks   []hookCommand `json:"hooks"`
}

type hookCommand struct {
	Type    string `json:"type"`
	Command string `json:"command"`
	Timeout int    `json:"timeout,omitempty"`
}

// IsClaudemeshHook reports whether a hook command runs `claudemesh hook`.
func IsClaudemeshHook(command string) bool {
	f := strings.Fields(command)
	return len(f) >= 2 && strings.Contains(f[0], "claudemesh") && f[len(f)-1] == "hook"
}

// PlanHooks plans registering hookCommandLine (e.g. "claudemesh hook")
// for every event of InstalledEvents in the settings file at path. Nothing
// but claudemesh's own hook entries is ever touched. An event that already
// runs exactly this command is kept. Without force, an event running
// another claudemesh hook command (another path) is kept too, with a note;
// with force every claudemesh hook entry, in any event, is replaced, so
// the hooks and the MCP registration move to a new path together.
func PlanHooks(path, hookCommandLine string, force bool) (*Change, error) {
	o, before, mode, err := readObject(path)
	if err != nil {
		return nil, err
	}
	hooks, err := o.child("hooks")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var notes []string
	changed := false
	if force {
		removed, err := removeClaudemeshHooks(hooks, func(cmd string) bool { return cmd != hookCommandLine })
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		for _, r := range removed {
			notes = append(notes, "hooks."+r+": removed")
		}
		changed = len(removed) > 0
	}
	for _, ev := range InstalledEvents {
		groups, err := hookGroups(hooks, ev)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		switch cur := claudemeshCommands(groups); {
		case slices.Contains(cur, hookCommandLine):
			notes = append(notes, "hooks."+ev+": already there; kept")
			continue
		case len(cur) > 0:
			notes = append(notes, "hooks."+ev+": runs "+cur[0]+"; kept (use --force to replace it)")
			continue
		}
		g := hookGroup{Hooks: []hookCommand{{Type: "command", Command: hookCommandLine, Timeout: 10}}}
		if ev == EventPreToolUse || ev == EventPostToolUse {
			g.Matcher = "*"
		}
		data, _ := json.Marshal(g)
		groups = append(groups, data)
		if err := hooks.set(ev, groups); err != nil {
			return nil, err
		}
		notes = append(notes, "hooks."+ev+": added "+hookCommandLine)
		changed = true
	}
	if changed {
		if err := o.set("hooks", hooks); err != nil {
			return nil, err
		}
	}
	return finish(path, o, before, mode, notes, changed)
}

// PlanUnhooks plans removing every claudemesh hook entry from the settings
// file at path: hook groups left empty go, then events left empty, then the
// "hooks" object if it is left empty, so what install added is gone and
// everything else stays byte for byte.
func PlanUnhooks(path string) (*Change, error) {
	o, before, mode, err := readObject(path)
	if err != nil {
		return nil, err
	}
	if before == nil {
		return finish(path, o, before, mode, []string{"no settings file; nothing to remove"}, false)
	}
	if _, ok := o.get("hooks"); !ok {
		return finish(path, o, before, mode, []string{"no claudemesh hook; nothing to remove"}, false)
	}
	hooks, err := o.child("hooks")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	removed, err := removeClaudemeshHooks(hooks, func(string) bool { return true })
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(removed) == 0 {
		return finish(path, o, before, mode, []string{"no claudemesh hook; nothing to remove"}, false)
	}
	var notes []string
	for _, r := range removed {
		notes = append(notes, "hooks."+r+": removed")
	}
	if len(hooks.keys) == 0 {
		o.remove("hooks")
	} else if err := o.set("hooks", hooks); err != nil {
		return nil, err
	}
	return finish(path, o, before, mode, notes, true)
}

// hookGroups reads the hook groups of one event.
func hookGroups(hooks *object, ev string) ([]json.RawMessage, error) {
	var groups []json.RawMessage
	if raw, ok := hooks.get(ev); ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &groups); err != nil {
			return nil, fmt.Errorf("hooks.%s is not a list: %w", ev, err)
		}
	}
	return groups, nil
}

// claudemeshCommands lists the claudemesh hook commands of an event.
func claudemeshCommands(groups []json.RawMessage) []string {
	var out []string
	for _, raw := range groups {
		var g hookGroup
		if json.Unmarshal(raw, &g) != nil {
			continue
		}
		for _, h := range g.Hooks {
			if IsClaudemeshHook(h.Command) {
				out = append(out, h.Command)
			}
		}
	}
	return out
}

// removeClaudemeshHooks drops, in every event, the claudemesh hook entries
// whose command drop accepts. A group is rewritten only when it held one
// (its other keys and entries are kept as they were); a group left without
// entries goes, and so does an event left without groups. It returns the
// events it changed.
func removeClaudemeshHooks(hooks *object, drop func(command string) bool) ([]string, error) {
	var changed []string
	for _, ev := range slices.Clone(hooks.keys) {
		groups, err := hookGroups(hooks, ev)
		if err != nil {
			return nil, err
		}
		kept := make([]json.RawMessage, 0, len(groups))
		touched := false
		for _, raw := range groups {
			g := newObject()
			var entries []json.RawMessage
			if json.Unmarshal(raw, g) != nil {
				kept = append(kept, raw)
				continue
			}
			if hr, ok := g.get("hooks"); !ok || json.Unmarshal(hr, &entries) != nil {
				kept = append(kept, raw)
				continue
			}
			rest := make([]json.RawMessage, 0, len(entries))
			for _, e := range entries {
				var h hookCommand
				if json.Unmarshal(e, &h) == nil && IsClaudemeshHook(h.Command) && drop(h.Command) {
					continue
				}
				rest = append(rest, e)
			}
			switch {
			case len(rest) == len(entries):
				kept = append(kept, raw)
			case len(rest) == 0:
				touched = true
			default:
				touched = true
				if err := g.set("hooks", rest); err != nil {
					return nil, err
				}
				data, err := json.Marshal(g)
				if err != nil {
					return nil, err
				}
				kept = append(kept, data)
			}
		}
		if !touched {
			continue
		}
		changed = append(changed, ev)
		if len(kept) == 0 {
			hooks.remove(ev)
		} else if err := hooks.set(ev, kept); err != nil {
			return nil, err
		}
	}
	return changed, nil
}

func hasClaudemeshHook(groups []json.RawMessage) bool { return len(claudemeshCommands(groups)) > 0 }

// MCPServer is a stdio MCP server registration in ~/.claude.json.
type MCPServer struct {
	Type    string            `json:"type"`
	Command string            `json:"command"`
	Args    []string          `json:"args"`
	Env     map[string]string `json:"env,omitempty"`
}

// PlanMCP plans registering server under mcpServers.<name> in the file at
// path (~/.claude.json). An existing, different registration is kept unless
// force is set.
func PlanMCP(path, name string, server MCPServer, force bool) (*Change, error) {
	o, before, mode, err := readObject(path)
	if err != nil {
		return nil, err
	}
	servers, err := o.child("mcpServers")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if raw, ok := servers.get(name); ok {
		var cur MCPServer
		if json.Unmarshal(raw, &cur) == nil && cur.Command == server.Command && slices.Equal(cur.Args, server.Args) &&
			mapsEqual(cur.Env, server.Env) {
			return finish(path, o, before, mode, []string{"mcpServers." + name + ": already registered; kept"}, false)
		}
		if !force {
			return finish(path, o, before, mode, []string{"mcpServers." + name + ": a different registration exists; kept (use --force to replace it)"}, false)
		}
	}
	if err := servers.set(name, server); err != nil {
		return nil, err
	}
	if err := o.set("mcpServers", servers); err != nil {
		return nil, err
	}
	return finish(path, o, before, mode, []string{"mcpServers." + name + ": registered " + server.Command + " " + strings.Join(server.Args, " ")}, true)
}

// PlanUnMCP plans removing mcpServers.<name> from the file at path, when it
// is a claudemesh registration (it runs "<…claudemesh…> mcp …"); another
// server registered under that name is kept. An mcpServers object left
// empty goes too.
func PlanUnMCP(path, name string) (*Change, error) {
	o, before, mode, err := readObject(path)
	if err != nil {
		return nil, err
	}
	none := []string{"mcpServers." + name + ": not registered; nothing to remove"}
	if _, ok := o.get("mcpServers"); !ok || before == nil {
		return finish(path, o, before, mode, none, false)
	}
	servers, err := o.child("mcpServers")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	raw, ok := servers.get(name)
	if !ok {
		return finish(path, o, before, mode, none, false)
	}
	var cur MCPServer
	if json.Unmarshal(raw, &cur) != nil || !IsClaudemeshMCP(cur) {
		return finish(path, o, before, mode, []string{"mcpServers." + name + ": not a claudemesh registration; kept"}, false)
	}
	servers.remove(name)
	if len(servers.keys) == 0 {
		o.remove("mcpServers")
	} else if err := o.set("mcpServers", servers); err != nil {
		return nil, err
	}
	return finish(path, o, before, mode, []string{"mcpServers." + name + ": removed " + cur.Command + " " + strings.Join(cur.Args, " ")}, true)
}

// IsClaudemeshMCP reports whether a registration runs `claudemesh mcp …`.
func IsClaudemeshMCP(s MCPServer) bool {
	return strings.Contains(filepath.Base(s.Command), "claudemesh") && slices.Contains(s.Args, "mcp")
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// Apply writes the change: the old file is first copied to
// <path>.claudemesh-backup-<time> (-2, -3, … when a backup of that second
// exists: an earlier one is never overwritten), then the new content
// replaces it atomically (fsutil.WriteFileAtomic) with the old file's mode.
// It returns the backup's path ("" when there was no file).
func (c *Change) Apply(now time.Time) (string, error) {
	if !c.Changed {
		return "", nil
	}
	if err := os.MkdirAll(filepath.Dir(c.Path), 0o700); err != nil {
		return "", err
	}
	backup := ""
	if c.Before != nil {
		var err error
		if backup, err = writeBackup(c.Path, c.Before, now); err != nil {
			return "", fmt.Errorf("back up %s: %w", c.Path, err)
		}
	}
	if err := fsutil.WriteFileAtomic(c.Path, c.After, c.mode); err != nil {
		return backup, fmt.Errorf("write %s: %w", c.Path, err)
	}
	return backup, nil
}

// maxBackupsPerSecond bounds the names tried for one second's backup.
const maxBackupsPerSecond = 100

// writeBackup saves data under a backup name no other file has (created
// exclusively, so two installs in the same second keep both versions) and
// syncs it before the original is replaced.
func writeBackup(path string, data []byte, now time.Time) (string, error) {
	base := path + ".claudemesh-backup-" + now.UTC().Format("20060102T150405Z")
	for i := 1; i <= maxBackupsPerSecond; i++ {
		name := base
		if i > 1 {
			name = fmt.Sprintf("%s-%d", base, i)
		}
		f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", err
		}
		_, err = f.Write(data)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(name)
			return "", err
		}
		return name, nil
	}
	return "", fmt.Errorf("%d backups of %s in one second already exist", maxBackupsPerSecond, path)
}

// SettingsPaths are the settings files that may hold hooks for a session
// started in cwd: the user's, the project's and the project's local one.
func SettingsPaths(home, cwd string) []string {
	return []string{
		filepath.Join(home, ".claude", "settings.json"),
		filepath.Join(cwd, ".claude", "settings.json"),
		filepath.Join(cwd, ".claude", "settings.local.json"),
	}
}

// HooksInstalled reports whether any of the settings files runs a
// claudemesh hook (then the hook reports status and transcript inference
// must not compete with it).
func HooksInstalled(paths ...string) bool {
	for _, p := range paths {
		o, _, _, err := readObject(p)
		if err != nil {
			continue
		}
		hooks, err := o.child("hooks")
		if err != nil {
			continue
		}
		for _, k := range hooks.keys {
			var groups []json.RawMessage
			if json.Unmarshal(hooks.vals[k], &groups) == nil && hasClaudemeshHook(groups) {
				return true
			}
		}
	}
	return false
}

// ShellQuote quotes s for a POSIX shell when it needs quoting.
func ShellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=@+,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// TemporaryBuild reports whether path is a binary that `go run` (or `go
// test`) built in a temporary folder (…/go-build123/b001/exe/claudemesh):
// it is deleted when that command exits, so registering it would leave
// Claude Code with hooks and an MCP server that cannot start.
func TemporaryBuild(path string) bool {
	parts := strings.Split(filepath.ToSlash(filepath.Clean(path)), "/")
	for i, p := range parts {
		if strings.HasPrefix(p, "go-build") && strings.Trim(strings.TrimPrefix(p, "go-build"), "0123456789") == "" && i < len(parts)-1 {
			return true
		}
	}
	return false
}
