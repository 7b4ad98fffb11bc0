// Package profile is a claudemesh user's configuration folder: the identity
// key pair, the meshes joined, and where the local state lives. The folder is
// ~/.claudemesh, or $CLAUDEMESH_CONFIG_DIR; it is created with mode 0700 and
// every file in it with mode 0600, since it holds secret keys.
package profile

import (
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/fsutil"
	"github.com/claudemesh/broker/internal/localstore"
)

// EnvConfigDir overrides the folder.
const EnvConfigDir = "CLAUDEMESH_CONFIG_DIR"

// File names inside the folder.
const (
	identityFile = "identity.json"
	meshesFile   = "meshes.json"
	stateFile    = "state.db"
	runDir       = "run"
)

// Errors a person can act on.
var (
	ErrNoIdentity     = errors.New("no identity yet: run `claudemesh keygen` (or `claudemesh join <invite>`, which creates one)")
	ErrNotJoined      = errors.New("not joined to any mesh: run `claudemesh join <invite>` with the invite link you were given")
	ErrIdentityExists = errors.New("an identity already exists")
)

// Dir resolves the folder from the environment and the home directory.
func Dir(getenv func(string) string, home string) (string, error) {
	if d := getenv(EnvConfigDir); d != "" {
		return filepath.Abs(d)
	}
	if home == "" {
		return "", errors.New("cannot find the home directory; set " + EnvConfigDir)
	}
	return filepath.Join(home, ".claudemesh"), nil
}

// Profile is an opened configuration folder.
type Profile struct {
	Dir string
}

// Open returns the profile in dir, creating the folder if needed. An
// existing folder (or secret file in it) that others may read is made
// private again: the folder holds the secret key, and a mode widened by
// hand, a restored backup or an older tool must not stay so.
func Open(dir string) (*Profile, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a folder", dir)
	}
	if err := tighten(dir, fi.Mode().Perm(), 0o700); err != nil {
		return nil, err
	}
	for _, name := range []string{identityFile, meshesFile, stateFile} {
		path := filepath.Join(dir, name)
		if fi, err := os.Lstat(path); err == nil && fi.Mode().IsRegular() {
			if err := tighten(path, fi.Mode().Perm(), 0o600); err != nil {
				return nil, err
			}
		}
	}
	return &Profile{Dir: dir}, nil
}

// tighten removes every permission bit beyond want.
func tighten(path string, mode, want os.FileMode) error {
	if mode&^want == 0 {
		return nil
	}
	if err := os.Chmod(path, mode&want); err != nil {
		return fmt.Errorf("%s can be read by others (mode %#o) and cannot be made private: %w", path, mode, err)
	}
	return nil
}

// Identity is the user's key pair as stored.
type Identity struct {
	Pubkey    string    `json:"pubkey"`
	SecretKey string    `json:"secretKey"`
	CreatedAt time.Time `json:"createdAt"`
}

// Key returns the parsed secret key.
func (id *Identity) Key() (ed25519.PrivateKey, error) {
	priv, err := e2e.ParseSecretKeyHex(id.SecretKey)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if hex.EncodeToString(priv.Public().(ed25519.PublicKey)) != strings.ToLower(id.Pubkey) {
		return nil, errors.New("identity: pubkey does not match the secret key")
	}
	return priv, nil
}

// IdentityPath is where the key pair is stored.
func (p *Profile) IdentityPath() string { return filepath.Join(p.Dir, identityFile) }

// LoadIdentity reads the key pair; ErrNoIdentity when there is none.
func (p *Profile) LoadIdentity() (*Identity, error) {
	var id Identity
	if err := readJSON(p.IdentityPath(), &id); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, ErrNoIdentity
		}
		return nil, err
	}
	if _, err := id.Key(); err != nil {
		return nil, fmt.Errorf("%s: %w", p.IdentityPath(), err)
	}
	return &id, nil
}

// NewIdentity generates a key pair.
func NewIdentity() (*Identity, error) {
	pub, priv, err := e2e.GenerateKey()
	if err != nil {
		return nil, err
	}
	return &Identity{Pubkey: hex.EncodeToString(pub), SecretKey: hex.EncodeToString(priv), CreatedAt: time.Now().UTC()}, nil
}

// CreateIdentity generates and saves a key pair. Without force it refuses
// to replace an existing one (the meshes joined with it would be lost).
func (p *Profile) CreateIdentity(force bool) (*Identity, error) {
	if !force {
		if _, err := os.Stat(p.IdentityPath()); err == nil {
			return nil, fmt.Errorf("%w at %s; meshes joined with it would stop working if it were replaced (use --force to replace it anyway)", ErrIdentityExists, p.IdentityPath())
		}
	}
	id, err := NewIdentity()
	if err != nil {
		return nil, err
	}
	if err := writeJSON(p.IdentityPath(), id); err != nil {
		return nil, err
	}
	return id, nil
}

// Mesh is a joined mesh.
type Mesh struct {
	MeshID      string    `json:"meshId"`
	Slug        string    `json:"slug"`
	Name        string    `json:"name"`
	MemberID    string    `json:"memberId"`
	DisplayName string    `json:"displayName"`
	Role        string    `json:"role"`
	BrokerURLs  []string  `json:"brokerUrls"`
	RootKey     string    `json:"meshRootKey,omitempty"` // hex; seals broadcast and group messages
	Pubkey      string    `json:"pubkey"`                // the identity it was joined with
	JoinedAt    time.Time `json:"joinedAt"`
}

// MeshKey parses the mesh root key; nil when the mesh has none.
func (m *Mesh) MeshKey() (*[e2e.MeshKeySize]byte, error) {
	if m.RootKey == "" {
		return nil, nil
	}
	return e2e.ParseMeshKeyHex(m.RootKey)
}

// ClientIdentity is the client identity for this mesh.
func (m *Mesh) ClientIdentity(id *Identity) (client.Identity, error) {
	priv, err := id.Key()
	if err != nil {
		return client.Identity{}, err
	}
	if !strings.EqualFold(id.Pubkey, m.Pubkey) {
		return client.Identity{}, fmt.Errorf("mesh %s was joined with key %s…, but the current identity is %s…; join it again", m.Slug, short(m.Pubkey), short(id.Pubkey))
	}
	return client.Identity{MeshID: m.MeshID, MemberID: m.MemberID, Priv: priv}, nil
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

// Meshes is the meshes file.
type Meshes struct {
	Default string `json:"default,omitempty"` // mesh id
	Meshes  []Mesh `json:"meshes"`
}

// MeshesPath is where the joined meshes are listed.
func (p *Profile) MeshesPath() string { return filepath.Join(p.Dir, meshesFile) }

// LoadMeshes reads the joined meshes (none when the file does not exist).
func (p *Profile) LoadMeshes() (*Meshes, error) {
	var ms Meshes
	if err := readJSON(p.MeshesPath(), &ms); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return &ms, nil
}

// SaveMesh adds or replaces (by mesh id) a joined mesh; the first one
// becomes the default.
func (p *Profile) SaveMesh(m Mesh) error {
	ms, err := p.LoadMeshes()
	if err != nil {
		return err
	}
	replaced := false
	for i := range ms.Meshes {
		if ms.Meshes[i].MeshID == m.MeshID {
			ms.Meshes[i], replaced = m, true
		}
	}
	if !replaced {
		ms.Meshes = append(ms.Meshes, m)
	}
	if ms.Default == "" {
		ms.Default = m.MeshID
	}
	return writeJSON(p.MeshesPath(), ms)
}

// SetDefault makes the mesh matching ref the default.
func (p *Profile) SetDefault(ref string) (*Mesh, error) {
	ms, err := p.LoadMeshes()
	if err != nil {
		return nil, err
	}
	m, err := ms.find(ref)
	if err != nil {
		return nil, err
	}
	ms.Default = m.MeshID
	return m, writeJSON(p.MeshesPath(), ms)
}

// find matches ref against mesh ids, slugs and names.
func (ms *Meshes) find(ref string) (*Mesh, error) {
	for i := range ms.Meshes {
		m := &ms.Meshes[i]
		if m.MeshID == ref || m.Slug == ref || strings.EqualFold(m.Name, ref) {
			return m, nil
		}
	}
	if len(ms.Meshes) == 0 {
		return nil, ErrNotJoined
	}
	return nil, fmt.Errorf("not joined to a mesh %q; joined: %s", ref, ms.names())
}

func (ms *Meshes) names() string {
	names := make([]string, len(ms.Meshes))
	for i, m := range ms.Meshes {
		names[i] = m.Slug
	}
	return strings.Join(names, ", ")
}

// Select picks the mesh to act on: ref when given, else the default.
func (ms *Meshes) Select(ref string) (*Mesh, error) {
	if ref != "" {
		return ms.find(ref)
	}
	if len(ms.Meshes) == 0 {
		return nil, ErrNotJoined
	}
	if ms.Default != "" {
		if m, err := ms.find(ms.Default); err == nil {
			return m, nil
		}
	}
	if len(ms.Meshes) == 1 {
		return &ms.Meshes[0], nil
	}
	return nil, fmt.Errorf("joined to several meshes (%s): choose one with --mesh, or set a default with `claudemesh meshes use <mesh>`", ms.names())
}

// StatePath is the local state file.
func (p *Profile) StatePath() string { return filepath.Join(p.Dir, stateFile) }

// OpenState opens the local state file.
func (p *Profile) OpenState() (*localstore.Store, error) { return localstore.Open(p.StatePath()) }

// RunDir holds the control sockets of running sessions.
func (p *Profile) RunDir() string { return filepath.Join(p.Dir, runDir) }

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s is not valid JSON: %w", path, err)
	}
	return nil
}

// writeJSON replaces path atomically with mode 0600: a crash leaves the old
// file or the new one, never half of one.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, append(data, '\n'), 0o600)
}
