// Package localstore is a claudemesh user's local state: the outbox of
// messages the broker has not acked yet, the inbox of received messages
// (which also dedupes redeliveries), the peers seen so far (to address them
// by name while they are offline) and the hook throttle. It is one bbolt
// file shared by every claudemesh process of the user — the MCP server of
// each Claude Code session, hooks and CLI commands. The file is opened for
// each operation and closed right after, so processes take turns through
// bbolt's file lock and none holds it.
package localstore

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// Bounds on what the store keeps.
const (
	MaxOutbox = 10000
	MaxInbox  = 5000
	// KeepRead is how long read messages are kept: longer than the
	// broker's message TTL (7 days), so any redelivery is still deduped.
	KeepRead = 8 * 24 * time.Hour
	// MaxFailed bounds the rejected sends kept for `claudemesh outbox`.
	MaxFailed = 1000
)

var (
	rootBucket     = []byte("meshes")
	outboxBucket   = []byte("outbox")
	failedBucket   = []byte("failed")
	inboxBucket    = []byte("inbox")
	contactsBucket = []byte("contacts")
	hooksBucket    = []byte("hooks")
)

// Store is the state file.
type Store struct {
	path      string
	timeout   time.Duration
	maxOutbox int
}

// Open creates the file (mode 0600) if needed and checks that it opens.
func Open(path string) (*Store, error) {
	s := &Store{path: path, timeout: 10 * time.Second, maxOutbox: MaxOutbox}
	if err := s.update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(rootBucket)
		return err
	}); err != nil {
		return nil, err
	}
	return s, nil
}

// Path is the file's path.
func (s *Store) Path() string { return s.path }

func (s *Store) open(readOnly bool) (*bolt.DB, error) {
	// Readers share the file lock; a writer takes it alone.
	db, err := bolt.Open(s.path, 0o600, &bolt.Options{Timeout: s.timeout, ReadOnly: readOnly})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("local state %s is locked by another claudemesh process for more than %s", s.path, s.timeout)
		}
		return nil, fmt.Errorf("open local state %s: %w", s.path, err)
	}
	return db, nil
}

func (s *Store) update(fn func(tx *bolt.Tx) error) error {
	db, err := s.open(false)
	if err != nil {
		return err
	}
	err = db.Update(fn)
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	return err
}

func (s *Store) view(fn func(tx *bolt.Tx) error) error {
	db, err := s.open(true)
	if err != nil {
		return err
	}
	err = db.View(fn)
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	return err
}

// Mesh is the part of the store for one mesh. It implements client.Outbox
// and client.Inbox.
type Mesh struct {
	s  *Store
	id []byte
}

var (
	_ client.Outbox = (*Mesh)(nil)
	_ client.Inbox  = (*Mesh)(nil)
)

// Mesh returns the state of mesh meshID.
func (s *Store) Mesh(meshID string) *Mesh { return &Mesh{s: s, id: []byte(meshID)} }

// bucket returns (creating when writable) the named bucket of the mesh; nil
// in a read-only transaction when it does not exist yet.
func (m *Mesh) bucket(tx *bolt.Tx, name []byte) (*bolt.Bucket, error) {
	root := tx.Bucket(rootBucket)
	if root == nil {
		return nil, errors.New("local state is not initialised")
	}
	if !tx.Writable() {
		mb := root.Bucket(m.id)
		if mb == nil {
			return nil, nil
		}
		return mb.Bucket(name), nil
	}
	mb, err := root.CreateBucketIfNotExists(m.id)
	if err != nil {
		return nil, err
	}
	return mb.CreateBucketIfNotExists(name)
}

func seqKey(n uint64) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], n)
	return k[:]
}

// Add stores an outbox entry.
func (m *Mesh) Add(e client.OutboxEntry) error {
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, outboxBucket)
		if err != nil {
			return err
		}
		if b.Stats().KeyN >= m.s.maxOutbox {
			return client.ErrOutboxFull
		}
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		return b.Put(seqKey(seq), data)
	})
}

// Pending lists the outbox, oldest first.
func (m *Mesh) Pending() ([]client.OutboxEntry, error) {
	var out []client.OutboxEntry
	err := m.s.view(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, outboxBucket)
		if b == nil || err != nil {
			return err
		}
		return b.ForEach(func(_, v []byte) error {
			var e client.OutboxEntry
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("corrupt outbox entry: %w", err)
			}
			out = append(out, e)
			return nil
		})
	})
	return out, err
}

// takeOutbox deletes the entry with id and returns it (nil if absent).
func takeOutbox(b *bolt.Bucket, id string) (*client.OutboxEntry, error) {
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		var e client.OutboxEntry
		if json.Unmarshal(v, &e) != nil || e.ClientMessageID != id {
			continue
		}
		if err := c.Delete(); err != nil {
			return nil, err
		}
		return &e, nil
	}
	return nil, nil
}

// Done removes an acked entry.
func (m *Mesh) Done(id string) error {
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, outboxBucket)
		if err != nil {
			return err
		}
		_, err = takeOutbox(b, id)
		return err
	})
}

// Failed is a send the broker rejected.
type Failed struct {
	client.OutboxEntry
	Code     string    `json:"code"`
	FailedAt time.Time `json:"failedAt"`
}

// Fail moves an entry from the outbox to the failed list.
func (m *Mesh) Fail(id, code string) error {
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, outboxBucket)
		if err != nil {
			return err
		}
		e, err := takeOutbox(b, id)
		if err != nil || e == nil {
			return err
		}
		fb, err := m.bucket(tx, failedBucket)
		if err != nil {
			return err
		}
		if fb.Stats().KeyN >= MaxFailed {
			if k, _ := fb.Cursor().First(); k != nil {
				if err := fb.Delete(k); err != nil {
					return err
				}
			}
		}
		seq, err := fb.NextSequence()
		if err != nil {
			return err
		}
		data, _ := json.Marshal(Failed{OutboxEntry: *e, Code: code, FailedAt: time.Now().UTC()})
		return fb.Put(seqKey(seq), data)
	})
}

// FailedSends lists rejected sends, oldest first.
func (m *Mesh) FailedSends() ([]Failed, error) {
	var out []Failed
	err := m.s.view(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, failedBucket)
		if b == nil || err != nil {
			return err
		}
		return b.ForEach(func(_, v []byte) error {
			var f Failed
			if err := json.Unmarshal(v, &f); err != nil {
				return fmt.Errorf("corrupt failed entry: %w", err)
			}
			out = append(out, f)
			return nil
		})
	})
	return out, err
}

// ClearFailed forgets the rejected sends.
func (m *Mesh) ClearFailed() error {
	return m.s.update(func(tx *bolt.Tx) error {
		root := tx.Bucket(rootBucket)
		mb, err := root.CreateBucketIfNotExists(m.id)
		if err != nil {
			return err
		}
		if mb.Bucket(failedBucket) == nil {
			return nil
		}
		return mb.DeleteBucket(failedBucket)
	})
}

// Stored is a message in the inbox.
type Stored struct {
	client.Message
	Read bool `json:"read"`
	// Announced: a hook already showed it to Claude (whole or cut).
	Announced bool `json:"announced,omitempty"`
}

// inboxKey orders messages by the broker's numeric id.
func inboxKey(id string) []byte {
	if id != "" && len(id) <= 20 && strings.Trim(id, "0123456789") == "" {
		return []byte(strings.Repeat("0", 20-len(id)) + id)
	}
	return []byte("~" + id)
}

// Record stores a received message unless its id was seen; it reports
// whether it is new.
func (m *Mesh) Record(msg client.Message) (bool, error) {
	data, err := json.Marshal(Stored{Message: msg})
	if err != nil {
		return false, err
	}
	isNew := false
	err = m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if err != nil {
			return err
		}
		k := inboxKey(msg.ID)
		if b.Get(k) != nil {
			return nil
		}
		isNew = true
		if err := b.Put(k, data); err != nil {
			return err
		}
		if seq, _ := b.NextSequence(); seq%64 == 0 {
			return pruneInbox(b, time.Now())
		}
		return nil
	})
	return isNew, err
}

// pruneInbox drops read messages older than KeepRead, then the oldest read
// messages while the inbox holds more than MaxInbox.
func pruneInbox(b *bolt.Bucket, now time.Time) error {
	var readKeys [][]byte
	total := 0
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		total++
		var s Stored
		if json.Unmarshal(v, &s) != nil || !s.Read {
			continue
		}
		if now.Sub(s.ReceivedAt) > KeepRead {
			if err := c.Delete(); err != nil {
				return err
			}
			total--
			continue
		}
		readKeys = append(readKeys, bytes.Clone(k))
	}
	for _, k := range readKeys {
		if total <= MaxInbox {
			break
		}
		if err := b.Delete(k); err != nil {
			return err
		}
		total--
	}
	return nil
}

// TakeUnread returns up to limit unread messages, oldest first, and marks
// them read in the same transaction, so two processes never both hand out
// one message. limit ≤ 0 means all.
func (m *Mesh) TakeUnread(limit int) ([]client.Message, error) {
	var out []client.Message
	err := m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if err != nil {
			return err
		}
		type upd struct {
			k, v []byte
		}
		var updates []upd
		c := b.Cursor()
		for k, v := c.First(); k != nil && (limit <= 0 || len(out) < limit); k, v = c.Next() {
			var s Stored
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("corrupt inbox entry: %w", err)
			}
			if s.Read {
				continue
			}
			s.Read = true
			data, _ := json.Marshal(s)
			updates = append(updates, upd{bytes.Clone(k), data})
			out = append(out, s.Message)
		}
		for _, u := range updates {
			if err := b.Put(u.k, u.v); err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}

// Urgent is a "now" message for a hook to show Claude.
type Urgent struct {
	client.Message
	// Cut: the text did not fit and was shortened; the message stays
	// unread for check_messages.
	Cut bool
}

// TakeUrgent returns, oldest first, the unread "now" messages no hook has
// shown yet, with at most maxBytes of text in all: a hook shows them to
// Claude in the middle of a turn. Those that fit whole are marked read
// (Claude has them); one that does not is cut, marked announced and left
// unread; the rest wait for the next hook. One transaction, so two hooks
// never show the same message.
func (m *Mesh) TakeUrgent(maxBytes int) ([]Urgent, error) {
	// Every tool call runs a hook: look (shared lock, no write) before
	// taking.
	found := false
	if err := m.s.view(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if b == nil || err != nil {
			return err
		}
		return b.ForEach(func(_, v []byte) error {
			var st Stored
			if json.Unmarshal(v, &st) == nil && !st.Read && !st.Announced && st.Priority == protocol.PriorityNow {
				found = true
			}
			return nil
		})
	}); err != nil || !found {
		return nil, err
	}
	var out []Urgent
	err := m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if err != nil {
			return err
		}
		budget := maxBytes
		c := b.Cursor()
		for k, v := c.First(); k != nil && budget > 0; k, v = c.Next() {
			var st Stored
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("corrupt inbox entry: %w", err)
			}
			if st.Read || st.Announced || st.Priority != protocol.PriorityNow {
				continue
			}
			u := Urgent{Message: st.Message}
			if len(st.Text) <= budget {
				st.Read = true
			} else {
				u.Text, u.Cut = cutUTF8(st.Text, budget), true
			}
			budget -= len(u.Text)
			st.Announced = true
			data, _ := json.Marshal(st)
			if err := b.Put(bytes.Clone(k), data); err != nil {
				return err
			}
			out = append(out, u)
		}
		return nil
	})
	return out, err
}

// MarkRead marks messages read: they reached Claude some other way.
func (m *Mesh) MarkRead(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if err != nil {
			return err
		}
		for _, id := range ids {
			k := inboxKey(id)
			v := b.Get(k)
			if v == nil {
				continue
			}
			var st Stored
			if json.Unmarshal(v, &st) != nil || st.Read {
				continue
			}
			st.Read = true
			data, _ := json.Marshal(st)
			if err := b.Put(k, data); err != nil {
				return err
			}
		}
		return nil
	})
}

// cutUTF8 shortens s to at most n bytes without splitting a character.
func cutUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}

// Messages lists stored messages, oldest first: the unread ones, or all of
// them with includeRead; at most the latest limit (≤ 0: all).
func (m *Mesh) Messages(includeRead bool, limit int) ([]Stored, error) {
	var out []Stored
	err := m.s.view(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, inboxBucket)
		if b == nil || err != nil {
			return err
		}
		return b.ForEach(func(_, v []byte) error {
			var s Stored
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("corrupt inbox entry: %w", err)
			}
			if includeRead || !s.Read {
				out = append(out, s)
			}
			return nil
		})
	})
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out, err
}

// Contact is a peer seen before.
type Contact struct {
	Pubkey string    `json:"pubkey"`
	Name   string    `json:"name"`
	SeenAt time.Time `json:"seenAt"`
}

// RememberPeers records pubkey → display name pairs seen in peer lists,
// pushes and events.
func (m *Mesh) RememberPeers(cs []Contact) error {
	if len(cs) == 0 {
		return nil
	}
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, contactsBucket)
		if err != nil {
			return err
		}
		for _, c := range cs {
			if c.Pubkey == "" || c.Name == "" {
				continue
			}
			if c.SeenAt.IsZero() {
				c.SeenAt = time.Now().UTC()
			}
			if old := b.Get([]byte(c.Pubkey)); old != nil {
				var prev Contact
				if json.Unmarshal(old, &prev) == nil && prev.Name == c.Name && c.SeenAt.Sub(prev.SeenAt) < time.Hour {
					continue // unchanged: spare the write
				}
			}
			data, _ := json.Marshal(c)
			if err := b.Put([]byte(c.Pubkey), data); err != nil {
				return err
			}
		}
		return nil
	})
}

// Contacts lists the peers seen, by name.
func (m *Mesh) Contacts() ([]Contact, error) {
	var out []Contact
	err := m.s.view(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, contactsBucket)
		if b == nil || err != nil {
			return err
		}
		return b.ForEach(func(_, v []byte) error {
			var c Contact
			if json.Unmarshal(v, &c) == nil {
				out = append(out, c)
			}
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// hookMark is the last status a hook posted for a key.
type hookMark struct {
	Status string    `json:"status"`
	At     time.Time `json:"at"`
}

// ClaimHook decides whether a hook should post status for key: not when
// the same status was posted for key less than window ago. When it returns
// true it has recorded the post.
func (m *Mesh) ClaimHook(key, status string, window time.Duration, now time.Time) (bool, error) {
	post := false
	err := m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, hooksBucket)
		if err != nil {
			return err
		}
		if v := b.Get([]byte(key)); v != nil {
			var h hookMark
			if json.Unmarshal(v, &h) == nil && h.Status == status && now.Sub(h.At) >= 0 && now.Sub(h.At) < window {
				return nil
			}
		}
		post = true
		if b.Stats().KeyN > 1000 {
			// Forget marks of old sessions.
			c := b.Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				var h hookMark
				if json.Unmarshal(v, &h) != nil || now.Sub(h.At) > time.Hour {
					if err := c.Delete(); err != nil {
						return err
					}
				}
			}
		}
		data, _ := json.Marshal(hookMark{Status: status, At: now})
		return b.Put([]byte(key), data)
	})
	return post, err
}

// ForgetHook drops the mark of key, so the next hook posts again (used
// when a post failed).
func (m *Mesh) ForgetHook(key string) error {
	return m.s.update(func(tx *bolt.Tx) error {
		b, err := m.bucket(tx, hooksBucket)
		if err != nil {
			return err
		}
		return b.Delete([]byte(key))
	})
}
