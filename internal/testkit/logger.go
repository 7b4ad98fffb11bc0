package testkit

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
)

// Logger returns a logger for tests that renders every record as the
// broker does (JSON) and fails t on a line that repeats a key: parsers
// keep one of the two values, so the other is lost to the operator. It is
// silent unless BROKER_TEST_LOG=1 (then lines go to stderr too).
func Logger(t testing.TB) *slog.Logger {
	w := &checkWriter{t: t}
	if os.Getenv("BROKER_TEST_LOG") != "" {
		w.also = os.Stderr
	}
	// After the test, a late line is not checked: t may no longer be told.
	t.Cleanup(func() { w.done.Store(true) })
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// CaptureLogger is Logger that also keeps every line it renders, for
// tests of what the broker logs.
func CaptureLogger(t testing.TB) (*slog.Logger, *LogLines) {
	lines := &LogLines{}
	w := &checkWriter{t: t, lines: lines}
	if os.Getenv("BROKER_TEST_LOG") != "" {
		w.also = os.Stderr
	}
	t.Cleanup(func() { w.done.Store(true) })
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})), lines
}

// LogLines are the records a CaptureLogger rendered.
type LogLines struct {
	mu    sync.Mutex
	lines []map[string]any
}

// Matching returns the records whose level and message are level and msg.
func (l *LogLines) Matching(level, msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, r := range l.lines {
		if r["level"] == level && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// Level returns the records of a level (such as "WARN").
func (l *LogLines) Level(level string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, r := range l.lines {
		if r["level"] == level {
			out = append(out, r)
		}
	}
	return out
}

func (l *LogLines) add(p []byte) {
	var r map[string]any
	if json.Unmarshal(p, &r) != nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) < 100000 {
		l.lines = append(l.lines, r)
	}
}

// checkWriter receives one record per Write (slog's JSON handler writes a
// record at once).
type checkWriter struct {
	t     testing.TB
	also  io.Writer
	lines *LogLines // nil unless captured
	mu    sync.Mutex
	done  atomic.Bool
}

func (w *checkWriter) Write(p []byte) (int, error) {
	if key, err := DuplicateKey(p); !w.done.Load() {
		switch {
		case err != nil:
			w.t.Errorf("log line is not one JSON object (%v): %s", err, p)
		case key != "":
			w.t.Errorf("log line repeats the key %q: %s", key, p)
		}
	}
	if w.lines != nil {
		w.lines.add(p)
	}
	if w.also != nil {
		w.mu.Lock()
		defer w.mu.Unlock()
		_, _ = w.also.Write(p)
	}
	return len(p), nil
}

// DuplicateKey returns the first key that a JSON object in line repeats
// (at any depth), or "".
func DuplicateKey(line []byte) (string, error) {
	dec := json.NewDecoder(bytes.NewReader(line))
	var walk func() (string, error)
	walk = func() (string, error) {
		tok, err := dec.Token()
		if err != nil {
			return "", err
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return "", err
				}
				key, _ := k.(string)
				if seen[key] {
					return key, nil
				}
				seen[key] = true
				if dup, err := walk(); dup != "" || err != nil {
					return dup, err
				}
			}
			_, err = dec.Token() // '}'
			return "", err
		case json.Delim('['):
			for dec.More() {
				if dup, err := walk(); dup != "" || err != nil {
					return dup, err
				}
			}
			_, err = dec.Token() // ']'
			return "", err
		}
		return "", nil
	}
	return walk()
}
