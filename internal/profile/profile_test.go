package profile_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/profile"
)

func TestDir(t *testing.T) {
	env := map[string]string{}
	getenv := func(k string) string { return env[k] }
	d, err := profile.Dir(getenv, "/home/u")
	if err != nil || d != "/home/u/.claudemesh" {
		t.Fatalf("%q %v", d, err)
	}
	env[profile.EnvConfigDir] = "/srv/cm"
	if d, _ := profile.Dir(getenv, "/home/u"); d != "/srv/cm" {
		t.Fatalf("override: %q", d)
	}
	delete(env, profile.EnvConfigDir)
	if _, err := profile.Dir(getenv, ""); err == nil {
		t.Fatal("no home accepted")
	}
}

func TestIdentity(t *testing.T) {
	p, err := profile.Open(filepath.Join(t.TempDir(), "cm"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.LoadIdentity(); !errors.Is(err, profile.ErrNoIdentity) {
		t.Fatalf("err = %v", err)
	}
	id, err := p.CreateIdentity(false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateIdentity(false); !errors.Is(err, profile.ErrIdentityExists) {
		t.Fatalf("second create: %v", err)
	}
	got, err := p.LoadIdentity()
	if err != nil || got.Pubkey != id.Pubkey {
		t.Fatalf("%+v %v", got, err)
	}
	fi, _ := os.Stat(p.IdentityPath())
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode().Perm())
	}
	replaced, err := p.CreateIdentity(true)
	if err != nil || replaced.Pubkey == id.Pubkey {
		t.Fatalf("force: %v", err)
	}
	// A mesh joined with the old key is refused with the current one.
	m := profile.Mesh{MeshID: "m1", Slug: "one", Pubkey: id.Pubkey, MemberID: "x"}
	if _, err := m.ClientIdentity(replaced); err == nil || !strings.Contains(err.Error(), "join it again") {
		t.Fatalf("key mismatch: %v", err)
	}
	// A corrupted identity file is reported, not used.
	if err := os.WriteFile(p.IdentityPath(), []byte(`{"pubkey":"00","secretKey":"zz"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := p.LoadIdentity(); err == nil {
		t.Fatal("corrupt identity accepted")
	}
}

func TestMeshSelection(t *testing.T) {
	p, err := profile.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ms, _ := p.LoadMeshes()
	if _, err := ms.Select(""); !errors.Is(err, profile.ErrNotJoined) {
		t.Fatalf("no mesh: %v", err)
	}
	for _, m := range []profile.Mesh{{MeshID: "id-1", Slug: "one", Name: "First"}, {MeshID: "id-2", Slug: "two", Name: "Second"}} {
		if err := p.SaveMesh(m); err != nil {
			t.Fatal(err)
		}
	}
	ms, _ = p.LoadMeshes()
	if m, err := ms.Select(""); err != nil || m.Slug != "one" {
		t.Fatalf("default: %+v %v", m, err)
	}
	for _, ref := range []string{"two", "id-2", "second"} {
		if m, err := ms.Select(ref); err != nil || m.MeshID != "id-2" {
			t.Errorf("Select(%q) = %+v %v", ref, m, err)
		}
	}
	if _, err := ms.Select("three"); err == nil || !strings.Contains(err.Error(), "one, two") {
		t.Fatalf("unknown mesh: %v", err)
	}
	if _, err := p.SetDefault("two"); err != nil {
		t.Fatal(err)
	}
	// Re-joining replaces the entry instead of adding one.
	if err := p.SaveMesh(profile.Mesh{MeshID: "id-1", Slug: "one", Name: "First, renamed"}); err != nil {
		t.Fatal(err)
	}
	ms, _ = p.LoadMeshes()
	if len(ms.Meshes) != 2 || ms.Meshes[0].Name != "First, renamed" {
		t.Fatalf("%+v", ms.Meshes)
	}
	if m, _ := ms.Select(""); m.Slug != "two" {
		t.Fatalf("default after SetDefault: %+v", m)
	}
	// Several meshes without a usable default: ask to choose.
	ms.Default = ""
	if _, err := ms.Select(""); err == nil || !strings.Contains(err.Error(), "--mesh") {
		t.Fatalf("ambiguous: %v", err)
	}
}

// Opening a folder that others can read makes it, and its secret files,
// private again.
func TestOpenTightensModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cm")
	p, err := profile.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateIdentity(false); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p.IdentityPath(), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := profile.Open(dir); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{dir: 0o700, p.IdentityPath(): 0o600} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode().Perm() != want {
			t.Fatalf("%s: mode %v %v, want %#o", path, fi.Mode().Perm(), err, want)
		}
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := profile.Open(file); err == nil {
		t.Fatal("a file accepted as the folder")
	}
}
