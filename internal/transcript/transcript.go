// Package transcript infers whether a Claude Code session is working or
// idle from its session transcript, for sessions that have no claudemesh
// hook installed.
//
// Claude Code appends one JSON object per line to
// ~/.claude/projects/<cwd with every non-alphanumeric character replaced
// by '-'>/<session id>.jsonl. Assistant entries ("type":"assistant") carry
// message.content items; a {"type":"tool_use","id":…} item is answered by a
// later user entry carrying {"type":"tool_result","tool_use_id":…}. The
// session is working while a tool call of the main conversation has no
// result yet, or while a prompt the user typed has no assistant reply yet;
// otherwise it is idle. An interruption by the user ends the turn.
package transcript

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Statuses inferred.
const (
	Idle    = "idle"
	Working = "working"
)

// EncodeCwd is the folder name Claude Code uses for a working directory:
// JavaScript's cwd.replace(/[^a-zA-Z0-9]/g, "-"), which replaces each UTF-16
// code unit, so a character outside the Basic Multilingual Plane becomes
// two dashes.
func EncodeCwd(cwd string) string {
	var b strings.Builder
	for _, r := range cwd {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case r > 0xFFFF:
			b.WriteString("--")
		default:
			b.WriteByte('-')
		}
	}
	return b.String()
}

// ProjectDir is the folder holding the transcripts of sessions started in
// cwd.
func ProjectDir(home, cwd string) string {
	return filepath.Join(home, ".claude", "projects", EncodeCwd(cwd))
}

// Latest returns the most recently modified transcript in dir.
func Latest(dir string) (path string, mod time.Time, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", time.Time{}, err
	}
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".jsonl") {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		if path == "" || fi.ModTime().After(mod) {
			path, mod = filepath.Join(dir, e.Name()), fi.ModTime()
		}
	}
	if path == "" {
		return "", time.Time{}, os.ErrNotExist
	}
	return path, mod, nil
}

// entry is the part of a transcript line the inference reads.
type entry struct {
	Type        string `json:"type"`
	IsSidechain bool   `json:"isSidechain"`
	IsMeta      bool   `json:"isMeta"`
	Message     struct {
		Content json.RawMessage `json:"content"`
	} `json:"message"`
}

type item struct {
	Type      string `json:"type"`
	ID        string `json:"id"`
	ToolUseID string `json:"tool_use_id"`
	Text      string `json:"text"`
}

// state is the inference over the lines seen so far.
type state struct {
	pending  map[string]bool // tool_use ids without a result
	prompted bool            // the last main-chain entry is a user prompt
	decided  bool            // at least one user or assistant entry was seen
}

func (s *state) line(data []byte) {
	var e entry
	if json.Unmarshal(data, &e) != nil || e.IsSidechain {
		return // not an entry we understand, or a subagent's own turn
	}
	switch e.Type {
	case "assistant":
		s.decided = true
		s.prompted = false
		var items []item
		if json.Unmarshal(e.Message.Content, &items) != nil {
			return
		}
		for _, it := range items {
			if it.Type == "tool_use" && it.ID != "" {
				s.pending[it.ID] = true
			}
		}
	case "user":
		if e.IsMeta {
			return
		}
		s.decided = true
		var text string
		if json.Unmarshal(e.Message.Content, &text) == nil {
			s.userText(text)
			return
		}
		var items []item
		if json.Unmarshal(e.Message.Content, &items) != nil {
			return
		}
		results := false
		for _, it := range items {
			switch it.Type {
			case "tool_result":
				delete(s.pending, it.ToolUseID)
				results = true
			case "text":
				if !results {
					s.userText(it.Text)
				}
			}
		}
		if results {
			s.prompted = false
		}
	}
}

// userText handles a user message that is not a tool result.
func (s *state) userText(text string) {
	text = strings.TrimSpace(text)
	switch {
	case strings.HasPrefix(text, "[Request interrupted by user"):
		clear(s.pending)
		s.prompted = false
	case strings.HasPrefix(text, "<command-name>"), strings.HasPrefix(text, "<local-command-stdout>"),
		strings.HasPrefix(text, "<local-command-stderr>"):
		// A local slash command (/model, /clear …) and its output: Claude
		// does not answer these.
	default:
		s.prompted = true
	}
}

func (s *state) status() string {
	if len(s.pending) > 0 || s.prompted {
		return Working
	}
	return Idle
}

// Infer reads a whole transcript and returns its status.
func Infer(r io.Reader) (string, error) {
	st, err := infer(r)
	if err != nil {
		return "", err
	}
	return st.status(), nil
}

func infer(r io.Reader) (*state, error) {
	st := &state{pending: map[string]bool{}}
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			st.line(line)
		}
		if errors.Is(err, io.EOF) {
			return st, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// Window bounds for InferFile: it reads the end of the file, from
// firstWindow bytes up to maxWindow, until it finds a conversation entry.
const (
	firstWindow = 512 << 10
	maxWindow   = 16 << 20
)

// InferFile infers the status of a transcript from its end, so that a
// long session costs a bounded read.
func InferFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	size := fi.Size()
	for w := int64(firstWindow); ; w *= 2 {
		off := max(size-w, 0)
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			return "", err
		}
		r := bufio.NewReader(io.LimitReader(f, size-off))
		if off > 0 {
			// Skip the partial first line.
			if _, err := r.ReadBytes('\n'); err != nil {
				return Idle, nil
			}
		}
		st, err := infer(r)
		if err != nil {
			return "", err
		}
		if st.decided || off == 0 || w >= maxWindow {
			return st.status(), nil
		}
	}
}
