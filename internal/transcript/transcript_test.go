package transcript_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/transcript"
)

// Every fixture is named after the status it must yield.
func TestFixtures(t *testing.T) {
	files, err := filepath.Glob("testdata/*.jsonl")
	if err != nil || len(files) < 8 {
		t.Fatalf("fixtures: %v %v", files, err)
	}
	for _, path := range files {
		want := strings.SplitN(filepath.Base(path), "_", 2)[0]
		t.Run(filepath.Base(path), func(t *testing.T) {
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := transcript.Infer(f)
			if err != nil || got != want {
				t.Fatalf("Infer = %q %v, want %q", got, err, want)
			}
			got, err = transcript.InferFile(path)
			if err != nil || got != want {
				t.Fatalf("InferFile = %q %v, want %q", got, err, want)
			}
		})
	}
}

func TestEncodeCwd(t *testing.T) {
	for in, want := range map[string]string{
		"/home/dev/my_proj":     "-home-dev-my-proj",
		"/Users/a.b/Code/x-y z": "-Users-a-b-Code-x-y-z",
		`C:\Users\dev\proj`:     "C--Users-dev-proj",
		"/tmp/ünïcode":          "-tmp--n-code",
		"/tmp/😀":                "-tmp---",
	} {
		if got := transcript.EncodeCwd(in); got != want {
			t.Errorf("EncodeCwd(%q) = %q, want %q", in, got, want)
		}
	}
	if got := transcript.ProjectDir("/home/dev", "/home/dev/p"); got != filepath.Join("/home/dev", ".claude", "projects", "-home-dev-p") {
		t.Errorf("ProjectDir = %q", got)
	}
}

// A transcript larger than the first read window is judged from its end:
// the pending tool call at the end wins over everything before it, and a
// huge last line is read whole.
func TestInferFileLargeTail(t *testing.T) {
	var b bytes.Buffer
	for i := range 4000 {
		fmt.Fprintf(&b, `{"type":"user","message":{"role":"user","content":"prompt %d"}}`+"\n", i)
		fmt.Fprintf(&b, `{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"answer %d %s"}]}}`+"\n", i, strings.Repeat("x", 200))
	}
	big := strings.Repeat("y", 2<<20)
	fmt.Fprintf(&b, `{"type":"assistant","message":{"role":"assistant","content":[{"type":"tool_use","id":"toolu_big","name":"Write","input":{"content":"%s"}}]}}`+"\n", big)
	path := filepath.Join(t.TempDir(), "s.jsonl")
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := transcript.InferFile(path)
	if err != nil || got != transcript.Working {
		t.Fatalf("InferFile = %q %v", got, err)
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, `{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_big","content":"ok"}]}}`)
	fmt.Fprintln(f, `{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"Written."}]}}`)
	f.Close()
	if got, _ := transcript.InferFile(path); got != transcript.Idle {
		t.Fatalf("after the result: %q", got)
	}
}

func TestLatest(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := transcript.Latest(dir); !os.IsNotExist(err) {
		t.Fatalf("empty dir: %v", err)
	}
	old := filepath.Join(dir, "old.jsonl")
	cur := filepath.Join(dir, "cur.jsonl")
	for _, p := range []string{old, cur, filepath.Join(dir, "notes.txt")} {
		if err := os.WriteFile(p, []byte("{}\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	got, _, err := transcript.Latest(dir)
	if err != nil || got != cur {
		t.Fatalf("Latest = %q %v", got, err)
	}
}

func FuzzInfer(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.jsonl")
	for _, p := range files {
		data, _ := os.ReadFile(p)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := transcript.Infer(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if got != transcript.Idle && got != transcript.Working {
			t.Fatalf("status %q", got)
		}
	})
}
