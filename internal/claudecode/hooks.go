// Package claudecode knows the parts of Claude Code that claudemesh plugs
// into: the hook events and what they mean for a session's status, the
// settings files where hooks and MCP servers are registered, and the
// process a hook or an MCP server runs under.
package claudecode

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// HookInput is the JSON Claude Code writes on a hook command's stdin.
// Fields not listed are ignored.
type HookInput struct {
	SessionID      string `json:"session_id"`
	TranscriptPath string `json:"transcript_path"`
	Cwd            string `json:"cwd"`
	Event          string `json:"hook_event_name"`
	Source         string `json:"source,omitempty"` // SessionStart: startup, resume, clear, compact
	Reason         string `json:"reason,omitempty"` // SessionEnd
	ToolName       string `json:"tool_name,omitempty"`
}

// maxHookInput bounds what is read from stdin (tool inputs can be large).
const maxHookInput = 4 << 20

// ParseHookInput reads a hook event.
func ParseHookInput(r io.Reader) (*HookInput, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxHookInput+1))
	if err != nil {
		return nil, fmt.Errorf("read hook input: %w", err)
	}
	if len(data) > maxHookInput {
		return nil, errors.New("hook input larger than 4 MiB")
	}
	var in HookInput
	if err := json.Unmarshal(data, &in); err != nil {
		return nil, fmt.Errorf("hook input is not a JSON object: %w", err)
	}
	if in.Event == "" {
		return nil, errors.New("hook input has no hook_event_name")
	}
	return &in, nil
}

// Hook events claudemesh reacts to.
const (
	EventSessionStart     = "SessionStart"
	EventUserPromptSubmit = "UserPromptSubmit"
	EventPreToolUse       = "PreToolUse"
	EventPostToolUse      = "PostToolUse"
	EventSubagentStop     = "SubagentStop"
	EventPreCompact       = "PreCompact"
	EventStop             = "Stop"
	EventSessionEnd       = "SessionEnd"
)

// StatusForEvent maps a hook event to the session status it implies. ok
// is false for events that say nothing about it (Notification, for one,
// fires both while Claude waits for a permission and when it is idle).
func StatusForEvent(event string) (status string, ok bool) {
	switch event {
	case EventUserPromptSubmit, EventPreToolUse, EventPostToolUse, EventSubagentStop, EventPreCompact:
		return "working", true // Claude is on a turn
	case EventSessionStart, EventStop, EventSessionEnd:
		return "idle", true // the turn is over, or there is none
	}
	return "", false
}

// InstalledEvents are the events `claudemesh install` registers the hook
// for: the turn's start, each tool call (so a resumed turn is seen), and
// its end
// (PostToolUse also lets an urgent message reach Claude mid-turn).
var InstalledEvents = []string{EventSessionStart, EventUserPromptSubmit, EventPreToolUse, EventPostToolUse, EventStop, EventSessionEnd}

// AddsContext reports whether a hook for this event can add context to the
// conversation: UserPromptSubmit and SessionStart through plain stdout,
// PostToolUse through JSON output (see HookContext).
func AddsContext(event string) bool {
	return event == EventUserPromptSubmit || event == EventSessionStart || event == EventPostToolUse
}

// HookContext renders context for Claude as the hook's stdout. For
// PostToolUse, plain stdout only reaches the transcript view, so it is the
// JSON form Claude Code reads: hookSpecificOutput.additionalContext.
func HookContext(event, text string) ([]byte, error) {
	if event != EventPostToolUse {
		return []byte(text), nil
	}
	out := map[string]any{"hookSpecificOutput": map[string]any{"hookEventName": event, "additionalContext": text}}
	data, err := json.Marshal(out)
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}
