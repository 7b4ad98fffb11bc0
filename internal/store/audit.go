package store

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Audit event types. Metadata never holds ciphertext or nonce.
const (
	EventPeerConnected    = "peer_connected"
	EventPeerDisconnected = "peer_disconnected"
	EventHelloRejected    = "hello_rejected"
	EventMessageQueued    = "message_queued"
	EventMessageDelivered = "message_delivered"
	EventMessageExpired   = "message_expired"
	EventMemberJoined     = "member_joined"
	EventMemberRevoked    = "member_revoked"
	EventInviteCreated    = "invite_created"
	EventInviteUsed       = "invite_used"
	EventStatusChanged    = "status_changed"
	EventMeshCreated      = "mesh_created"
	EventMemberAdded      = "member_added"
)

// AuditEvent is one audit_log row.
type AuditEvent struct {
	ID        int64          `json:"id"`
	MeshID    string         `json:"meshId,omitempty"`
	Type      string         `json:"type"`
	Actor     string         `json:"actor,omitempty"`
	Target    string         `json:"target,omitempty"`
	Metadata  map[string]any `json:"metadata,omitempty"`
	CreatedAt time.Time      `json:"createdAt"`
	// ActorName and TargetName are the display names of the members the
	// actor and target name (by member id, or for the actor by a live
	// member's pubkey), filled by ListAudit; never written.
	ActorName  string `json:"actorName,omitempty"`
	TargetName string `json:"targetName,omitempty"`
}

// InsertAudit writes events with COPY. When Postgres refuses some events
// the others are still written and the error is a *RowsError naming the
// events that were not.
func (s *Store) InsertAudit(ctx context.Context, events []AuditEvent) error {
	err := s.insertAudit(ctx, events)
	if err == nil || !IsDataError(err) {
		return err
	}
	re := &RowsError{Errs: make([]error, len(events))}
	isolate(0, len(events), err, func(lo, hi int) error { return s.insertAudit(ctx, events[lo:hi]) },
		func(i int, err error) { re.Errs[i] = err })
	return re
}

func (s *Store) insertAudit(ctx context.Context, events []AuditEvent) error {
	rows := make([][]any, len(events))
	for i, e := range events {
		meta, err := json.Marshal(e.Metadata)
		if err != nil || e.Metadata == nil {
			meta = []byte("{}")
		}
		created := e.CreatedAt
		if created.IsZero() {
			created = time.Now()
		}
		rows[i] = []any{nullable(e.MeshID), e.Type, nullable(e.Actor), nullable(e.Target), string(meta), created}
	}
	_, err := s.fast.CopyFrom(ctx, pgx.Identifier{"audit_log"},
		[]string{"mesh_id", "event_type", "actor", "target", "metadata", "created_at"}, pgx.CopyFromRows(rows))
	if err != nil {
		return fmt.Errorf("insert audit events: %w", err)
	}
	return nil
}

func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// ListAudit returns a mesh's newest events (all meshes when meshID is
// empty), optionally of one type, with the display names of the members
// they name. The names come from joins on the page of events, not from a
// query per row.
func (s *Store) ListAudit(ctx context.Context, meshID, eventType string, limit int) ([]AuditEvent, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT a.id, coalesce(a.mesh_id, ''), a.event_type, coalesce(a.actor, ''), coalesce(a.target, ''), a.metadata, a.created_at,
			coalesce(am.display_name, pm.display_name, ''), coalesce(tm.display_name, '')
		FROM (SELECT * FROM audit_log
			WHERE ($1 = '' OR mesh_id = $1) AND ($2 = '' OR event_type = $2)
			ORDER BY created_at DESC, id DESC LIMIT $3) a
		LEFT JOIN member am ON am.id = a.actor
		LEFT JOIN member pm ON am.id IS NULL AND pm.mesh_id = a.mesh_id AND pm.pubkey = a.actor AND pm.revoked_at IS NULL
		LEFT JOIN member tm ON tm.id = a.target
		ORDER BY a.created_at DESC, a.id DESC`, meshID, eventType, limit)
	if err != nil {
		return nil, fmt.Errorf("list audit: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (AuditEvent, error) {
		var e AuditEvent
		err := r.Scan(&e.ID, &e.MeshID, &e.Type, &e.Actor, &e.Target, &e.Metadata, &e.CreatedAt, &e.ActorName, &e.TargetName)
		return e, err
	})
}

// PurgeAudit deletes audit events older than retention among the limit
// oldest (ids grow with time, so this walks the primary key and stops at
// once when the oldest events are recent).
func (s *Store) PurgeAudit(ctx context.Context, retention time.Duration, limit int) (int64, error) {
	tag, err := s.fast.Exec(ctx, `
		DELETE FROM audit_log WHERE id IN (
			SELECT id FROM (SELECT id, created_at FROM audit_log ORDER BY id LIMIT $2) oldest
			WHERE created_at < now() - $1::interval)`, retention, limit)
	if err != nil {
		return 0, fmt.Errorf("purge audit: %w", err)
	}
	return tag.RowsAffected(), nil
}
