package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/relay"
)

// The store is the delivery engine's queue on Postgres.
var _ delivery.Queue = (*Store)(nil)

// InsertMessages commits a batch of messages and their delivery rows in one
// statement (one round trip, one transaction), with the batch's relay
// notifications, which Postgres delivers only if the transaction commits.
// Message ids are allocated in batch order, so two messages of one sender
// in one batch keep their order.
//
// A batch that Postgres refuses because of some of its messages is split
// until only those fail (their Inserted.Err is set); the others commit, in
// batch order, with their envelope notifications, and the wake-ups follow
// them. An error is returned only when nothing was committed for another
// reason (Postgres unreachable).
func (s *Store) InsertMessages(ctx context.Context, p *delivery.InsertParams) ([]delivery.Inserted, error) {
	msgs := p.Messages
	out := make([]delivery.Inserted, len(msgs))
	err := s.insertMessages(ctx, p, msgs, p.WakeChannels, p.WakePayloads, p.Envelopes, out)
	if err != nil && !IsDataError(err) {
		return nil, classify(err)
	}
	if err != nil {
		isolate(0, len(msgs), err, func(lo, hi int) error {
			return s.insertMessages(ctx, p, msgs[lo:hi], nil, nil, envelopesIn(p.Envelopes, lo, hi), out[lo:hi])
		}, func(i int, err error) { out[i] = delivery.Inserted{Err: err} })
		// The wake-ups belong to the batch, not to a row: they follow the
		// rows that were written (a wake-up for a row that was not costs a
		// claim that finds nothing; one lost is made good by the re-scan).
		_ = s.Notify(ctx, p.WakeChannels, p.WakePayloads)
	}
	for o := range out {
		if !out[o].Duplicate || out[o].Err != nil {
			continue
		}
		m := msgs[o]
		err := s.pool.QueryRow(ctx, duplicateMessageSQL,
			m.SenderMemberID, m.ClientMessageID).Scan(&out[o].ID, &out[o].CreatedAt)
		if err != nil {
			out[o].Err = classify(fmt.Errorf("find duplicate message: %w", err))
		}
	}
	return out, nil
}

// The envelope payload as the insert statement renders it (relay owns the
// format).
var (
	envelopeHead    = relay.EnvelopeHeadSQL("e.prefix", "ins.id", "ins.created_at")
	envelopePayload = relay.EnvelopePayloadSQL("h.head", "e.suffix", "e.digest", "$24::bytea", "$25::bytea")
)

// envelopesIn returns the envelopes of rows [lo, hi), numbered from lo.
func envelopesIn(envs []delivery.EnvelopeNotify, lo, hi int) []delivery.EnvelopeNotify {
	var out []delivery.EnvelopeNotify
	for _, e := range envs {
		if e.Ord >= lo && e.Ord < hi {
			e.Ord -= lo
			out = append(out, e)
		}
	}
	return out
}

// insertMessages runs InsertMessages' statement over msgs and fills out
// (one Inserted per message; duplicates are only flagged).
func (s *Store) insertMessages(ctx context.Context, p *delivery.InsertParams, msgs []delivery.NewMessage, channels, payloads []string, envs []delivery.EnvelopeNotify, out []delivery.Inserted) error {
	n := len(msgs)
	var (
		ord      = make([]int32, n)
		meshID   = make([]string, n)
		sender   = make([]string, n)
		spub     = make([]string, n)
		sname    = make([]string, n)
		target   = make([]string, n)
		prio     = make([]int16, n)
		nonce    = make([]string, n)
		cipher   = make([]string, n)
		cmid     = make([]*string, n)
		dOrd     []int32
		dMember  []string
		dConn    []*string
		dNode    []*string
		dTries   []int32
		nodeName = p.LeaseNode
		eOrd     = make([]int32, len(envs))
		eChan    = make([]string, len(envs))
		ePrefix  = make([]string, len(envs))
		eSuffix  = make([]string, len(envs))
		eDigest  = make([]string, len(envs))
	)
	if channels == nil {
		channels, payloads = []string{}, []string{}
	}
	for i, e := range envs {
		eOrd[i], eChan[i], ePrefix[i], eSuffix[i], eDigest[i] = int32(e.Ord), e.Channel, e.Prefix, e.Suffix, e.Digest
	}
	for i, m := range msgs {
		ord[i] = int32(i)
		meshID[i], sender[i], spub[i], sname[i] = m.MeshID, m.SenderMemberID, m.SenderPubkey, m.SenderName
		target[i], prio[i], nonce[i], cipher[i] = m.TargetSpec, m.Priority, m.Nonce, m.Ciphertext
		if m.ClientMessageID != "" {
			c := m.ClientMessageID
			cmid[i] = &c
		}
		for _, r := range m.Recipients {
			dOrd = append(dOrd, int32(i))
			dMember = append(dMember, r.MemberID)
			switch {
			case r.LeaseConn != "" && r.LeaseNode != "":
				c, n := r.LeaseConn, r.LeaseNode
				dConn, dNode, dTries = append(dConn, &c), append(dNode, &n), append(dTries, 0)
			case r.LeaseConn != "":
				c := r.LeaseConn
				dConn, dNode, dTries = append(dConn, &c), append(dNode, &nodeName), append(dTries, 1)
			default:
				dConn, dNode, dTries = append(dConn, nil), append(dNode, nil), append(dTries, 0)
			}
		}
	}
	rows, err := s.pool.Query(ctx, insertMessagesSQL,
		ord, meshID, sender, spub, sname, target, prio, nonce, cipher, cmid, p.TTL,
		dOrd, dMember, dConn, dNode, p.Lease, channels, payloads, eOrd, eChan, ePrefix, eSuffix, dTries,
		s.envInner, s.envOuter, eDigest)
	if err != nil {
		return fmt.Errorf("insert messages: %w", err)
	}
	for rows.Next() {
		var o int32
		var id, notified int64
		var created *time.Time
		if err := rows.Scan(&o, &id, &created, &notified); err != nil {
			rows.Close()
			return fmt.Errorf("insert messages: %w", err)
		}
		if created == nil {
			out[o] = delivery.Inserted{Duplicate: true}
			continue
		}
		out[o] = delivery.Inserted{ID: id, CreatedAt: *created}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("insert messages: %w", err)
	}
	return nil
}

// Claim leases deliverable rows for many members in one statement.
// Concurrent claimers on any node get disjoint rows (FOR UPDATE SKIP
// LOCKED); a row is deliverable when it is neither delivered nor expired
// and its lease (if any) has run out by Postgres' clock. Rows come back
// ordered by recipient, then message id.
func (s *Store) Claim(ctx context.Context, p *delivery.ClaimParams) ([]delivery.Delivery, error) {
	reqs := p.Requests
	if len(reqs) == 0 {
		return nil, nil
	}
	members := make([]string, len(reqs))
	conns := make([]string, len(reqs))
	maxp := make([]int16, len(reqs))
	limits := make([]int32, len(reqs))
	for i, r := range reqs {
		members[i], conns[i], maxp[i], limits[i] = r.MemberID, r.Conn, r.MaxPriority, r.Limit
	}
	rows, err := s.fast.Query(ctx, claimSQL,
		members, conns, maxp, limits, p.Node, p.Lease)
	if err != nil {
		return nil, classify(fmt.Errorf("claim deliveries: %w", err))
	}
	return collectClaimed(rows, "claim deliveries")
}

// TakeOver is Claim that also takes the live leases of node incarnations
// not in p.Keep, and of connections in p.Conns, on any node but p.Node.
// The taken rows' lease names p.Node from then on: the old holder's claim
// (lease_node), release (lease_conn) and mark (MarkParams.Node) no longer
// match them. Rows another transaction holds are skipped, as Claim does.
func (s *Store) TakeOver(ctx context.Context, p *delivery.TakeOverParams) ([]delivery.Delivery, error) {
	reqs := p.Requests
	if len(reqs) == 0 {
		return nil, nil
	}
	members := make([]string, len(reqs))
	conns := make([]string, len(reqs))
	maxp := make([]int16, len(reqs))
	limits := make([]int32, len(reqs))
	for i, r := range reqs {
		members[i], conns[i], maxp[i], limits[i] = r.MemberID, r.Conn, r.MaxPriority, r.Limit
	}
	keep, gone := p.Keep, p.Conns
	if keep == nil {
		keep = []string{}
	}
	if gone == nil {
		gone = []string{}
	}
	rows, err := s.fast.Query(ctx, takeOverSQL,
		members, conns, maxp, limits, p.Node, p.Lease, keep, gone)
	if err != nil {
		return nil, classify(fmt.Errorf("take over deliveries: %w", err))
	}
	return collectClaimed(rows, "take over deliveries")
}

func collectClaimed(rows pgx.Rows, what string) ([]delivery.Delivery, error) {
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (delivery.Delivery, error) {
		var d delivery.Delivery
		err := r.Scan(&d.MessageID, &d.MemberID, &d.Conn, &d.Attempts, &d.PrevConn, &d.MeshID, &d.SenderMemberID,
			&d.SenderPubkey, &d.SenderName, &d.TargetSpec, &d.Priority, &d.Nonce, &d.Ciphertext,
			&d.ClientMessageID, &d.CreatedAt)
		return d, err
	})
	if err != nil {
		return nil, classify(fmt.Errorf("%s: %w", what, err))
	}
	return out, nil
}

func splitKeys(keys []delivery.Key) ([]int64, []string) {
	ids := make([]int64, len(keys))
	members := make([]string, len(keys))
	for i, k := range keys {
		ids[i], members[i] = k.MessageID, k.MemberID
	}
	return ids, members
}

// MarkDelivered marks rows delivered (a client_ack, or a push written to a
// session without the client_ack capability). It returns the rows that
// were not already delivered. When Postgres refuses some keys the others
// are still marked and the error is a *RowsError naming the keys that
// were not; with any other error, done holds what was marked before it.
func (s *Store) MarkDelivered(ctx context.Context, p *delivery.MarkParams) (done []delivery.Key, err error) {
	keys := p.Keys
	done, err = s.markDelivered(ctx, keys, p.Node)
	if err == nil || !IsDataError(err) {
		return done, classify(err)
	}
	re := &RowsError{Errs: make([]error, len(keys))}
	isolate(0, len(keys), err, func(lo, hi int) error {
		d, err := s.markDelivered(ctx, keys[lo:hi], p.Node)
		done = append(done, d...)
		return err
	}, func(i int, err error) { re.Errs[i] = err })
	return done, re
}

func (s *Store) markDelivered(ctx context.Context, keys []delivery.Key, node string) ([]delivery.Key, error) {
	ids, members := splitKeys(keys)
	rows, err := s.fast.Query(ctx, markDeliveredSQL, ids, members, node)
	if err != nil {
		return nil, fmt.Errorf("mark delivered: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (delivery.Key, error) {
		var k delivery.Key
		err := r.Scan(&k.MessageID, &k.MemberID)
		return k, err
	})
	if err != nil {
		return nil, fmt.Errorf("mark delivered: %w", err)
	}
	return out, nil
}

// ReleaseLeases gives back rows leased to conn that were not delivered, so
// another session of the member can claim them at once. Keys Postgres
// refuses are left to their leases' expiry (a *RowsError); the others are
// released.
func (s *Store) ReleaseLeases(ctx context.Context, p *delivery.ReleaseParams) (int64, error) {
	conn, keys := p.Conn, p.Keys
	n, err := s.releaseLeases(ctx, conn, keys)
	if err == nil || !IsDataError(err) {
		return n, classify(err)
	}
	re := &RowsError{Errs: make([]error, len(keys))}
	isolate(0, len(keys), err, func(lo, hi int) error {
		m, err := s.releaseLeases(ctx, conn, keys[lo:hi])
		n += m
		return err
	}, func(i int, err error) { re.Errs[i] = err })
	return n, re
}

func (s *Store) releaseLeases(ctx context.Context, conn string, keys []delivery.Key) (int64, error) {
	ids, members := splitKeys(keys)
	tag, err := s.fast.Exec(ctx, releaseLeasesSQL, conn, ids, members)
	if err != nil {
		return 0, fmt.Errorf("release leases: %w", err)
	}
	return tag.RowsAffected(), nil
}

// ReleaseNodeLeases releases every live lease held by node incarnations
// matching the LIKE pattern, except the one named keep. It returns the
// members whose rows became claimable.
func (s *Store) ReleaseNodeLeases(ctx context.Context, p *delivery.ReleaseNodeParams) ([]delivery.MemberRef, error) {
	rows, err := s.fast.Query(ctx, `
		WITH rel AS (
			UPDATE delivery SET lease_conn = NULL, lease_node = NULL, lease_expires_at = NULL
			WHERE delivered_at IS NULL AND expired_at IS NULL AND lease_expires_at > now()
			  AND lease_node LIKE $1 AND lease_node <> $2
			RETURNING recipient_member_id
		)
		SELECT DISTINCT m.mesh_id, m.id FROM rel JOIN member m ON m.id = rel.recipient_member_id`, p.Pattern, p.Keep)
	if err != nil {
		return nil, classify(fmt.Errorf("release node leases: %w", err))
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (delivery.MemberRef, error) {
		var m delivery.MemberRef
		err := r.Scan(&m.MeshID, &m.MemberID)
		return m, err
	})
	if err != nil {
		return nil, classify(fmt.Errorf("release node leases: %w", err))
	}
	return out, nil
}

// ExpireDue marks up to p.Limit undelivered rows past their expiry.
func (s *Store) ExpireDue(ctx context.Context, p *delivery.ExpireParams) ([]delivery.Expired, error) {
	rows, err := s.fast.Query(ctx, `
		WITH due AS (
			SELECT message_id, recipient_member_id FROM delivery
			WHERE delivered_at IS NULL AND expired_at IS NULL AND expires_at <= now()
			LIMIT $1 FOR UPDATE SKIP LOCKED
		), upd AS (
			UPDATE delivery d SET expired_at = now(), lease_conn = NULL, lease_expires_at = NULL
			FROM due WHERE d.message_id = due.message_id AND d.recipient_member_id = due.recipient_member_id
			RETURNING d.message_id, d.recipient_member_id
		)
		SELECT u.message_id, u.recipient_member_id, m.mesh_id FROM upd u JOIN message m ON m.id = u.message_id`, p.Limit)
	if err != nil {
		return nil, classify(fmt.Errorf("expire deliveries: %w", err))
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (delivery.Expired, error) {
		var e delivery.Expired
		err := r.Scan(&e.MessageID, &e.MemberID, &e.MeshID)
		return e, err
	})
	if err != nil {
		return nil, classify(fmt.Errorf("expire deliveries: %w", err))
	}
	return out, nil
}

// Purge deletes up to limit messages older than retention that have no
// pending delivery, with their delivery rows, plus stale hello and pending
// hook rows. It returns the number of messages deleted.
func (s *Store) Purge(ctx context.Context, retention time.Duration, limit int) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, `
		WITH done AS (
			SELECT m.id FROM message m
			WHERE m.created_at < now() - $1::interval
			  AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.message_id = m.id
			                  AND d.delivered_at IS NULL AND d.expired_at IS NULL)
			ORDER BY m.created_at LIMIT $2
		), dd AS (
			DELETE FROM delivery d USING done WHERE d.message_id = done.id
		), dm AS (
			DELETE FROM message m USING done WHERE m.id = done.id RETURNING 1
		)
		SELECT count(*) FROM dm`, retention, limit).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("purge messages: %w", err)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM hello_seen WHERE expires_at < now()`); err != nil {
		return n, fmt.Errorf("purge hello_seen: %w", err)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM pending_status WHERE created_at < now() - interval '1 minute'`); err != nil {
		return n, fmt.Errorf("purge pending_status: %w", err)
	}
	return n, nil
}

// QueueDepth counts delivery rows still to deliver.
func (s *Store) QueueDepth(ctx context.Context) (int64, error) {
	var n int64
	err := s.fast.QueryRow(ctx, `SELECT count(*) FROM delivery WHERE delivered_at IS NULL AND expired_at IS NULL`).Scan(&n)
	return n, err
}

// MessageInfo is what message_status reports about one message.
type MessageInfo struct {
	ID             int64
	MeshID         string
	SenderMemberID string
	Priority       int16
	Recipients     []RecipientRow
}

// RecipientRow is one recipient's delivery state.
type RecipientRow struct {
	MemberID    string
	DisplayName string
	Delivered   bool
	Expired     bool
	Leased      bool
}

// MessageStatus loads a message of meshID and its delivery rows.
func (s *Store) MessageStatus(ctx context.Context, meshID string, id int64) (MessageInfo, error) {
	info := MessageInfo{ID: id}
	err := s.pool.QueryRow(ctx, `SELECT mesh_id, sender_member_id, priority FROM message WHERE id = $1 AND mesh_id = $2`, id, meshID).
		Scan(&info.MeshID, &info.SenderMemberID, &info.Priority)
	if errors.Is(err, pgx.ErrNoRows) {
		return info, ErrNotFound
	}
	if err != nil {
		return info, fmt.Errorf("message status: %w", err)
	}
	rows, err := s.pool.Query(ctx, `
		SELECT d.recipient_member_id, coalesce(mb.display_name, ''), d.delivered_at IS NOT NULL,
		       d.delivered_at IS NULL AND (d.expired_at IS NOT NULL OR d.expires_at <= now()),
		       d.delivered_at IS NULL AND d.lease_expires_at IS NOT NULL AND d.lease_expires_at > now()
		FROM delivery d LEFT JOIN member mb ON mb.id = d.recipient_member_id
		WHERE d.message_id = $1 ORDER BY mb.display_name, d.recipient_member_id`, id)
	if err != nil {
		return info, fmt.Errorf("message status: %w", err)
	}
	info.Recipients, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (RecipientRow, error) {
		var x RecipientRow
		err := r.Scan(&x.MemberID, &x.DisplayName, &x.Delivered, &x.Expired, &x.Leased)
		return x, err
	})
	if err != nil {
		return info, fmt.Errorf("message status: %w", err)
	}
	return info, nil
}

// Notify sends notifications in one statement (one notifying transaction).
func (s *Store) Notify(ctx context.Context, channels, payloads []string) error {
	if len(channels) == 0 {
		return nil
	}
	_, err := s.fast.Exec(ctx, notifySQL, channels, payloads)
	if err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	return nil
}

// duplicateMessageSQL finds the message a send repeats (InsertMessages).
var duplicateMessageSQL = hotSync("find duplicate message", `SELECT id, created_at FROM message WHERE sender_member_id = $1 AND client_message_id = $2`)

// insertMessagesSQL commits a batch of sends (InsertMessages).
var insertMessagesSQL = hotSync("insert messages", `
		WITH input AS (
			SELECT nextval('message_id_seq') AS id, u.*
			FROM (SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
			                           $7::int2[], $8::text[], $9::text[], $10::text[])
			          AS t(ord, mesh_id, sender_member_id, sender_pubkey, sender_name, target_spec,
			               priority, nonce, ciphertext, client_message_id)
			      ORDER BY ord) u
		), ins AS (
			INSERT INTO message (id, mesh_id, sender_member_id, sender_pubkey, sender_name, target_spec,
			                     priority, nonce, ciphertext, client_message_id, expires_at)
			SELECT id, mesh_id, sender_member_id, sender_pubkey, sender_name, target_spec,
			       priority, nonce, ciphertext, client_message_id, now() + $11::interval
			FROM input
			ON CONFLICT (sender_member_id, client_message_id) WHERE client_message_id IS NOT NULL DO NOTHING
			RETURNING id, created_at, expires_at
		), notified AS (
			-- Envelopes first, in batch order, then the member wake-ups: a
			-- node must see a row it may push directly before any wake-up
			-- that makes it claim the same member's later rows. pg_notify is
			-- volatile, so Postgres calls it after the sort.
			-- An envelope is completed and sealed here, where its id and
			-- commit time are known (relay.EnvelopePayloadSQL), with the
			-- key's HMAC pads ($24 inner, $25 outer).
			SELECT pg_notify(x.c, x.p) FROM (
				SELECT e.seq, e.c, `+envelopePayload+` AS p
				FROM unnest($19::int4[], $20::text[], $21::text[], $22::text[], $26::text[]) WITH ORDINALITY AS e(ord, c, prefix, suffix, digest, seq)
				JOIN input i ON i.ord = e.ord
				JOIN ins ON ins.id = i.id
				CROSS JOIN LATERAL (SELECT `+envelopeHead+` AS head) h
				UNION ALL
				SELECT 1000000000 + n.seq, n.c, n.p FROM unnest($17::text[], $18::text[]) WITH ORDINALITY AS n(c, p, seq)
			) x ORDER BY x.seq
		), dl AS (
			INSERT INTO delivery (message_id, recipient_member_id, priority, expires_at,
			                      lease_conn, lease_node, lease_expires_at, attempts)
			SELECT ins.id, d.member, i.priority, ins.expires_at, d.conn, d.node,
			       CASE WHEN d.conn IS NOT NULL THEN now() + $16::interval END, d.tries
			FROM unnest($12::int4[], $13::text[], $14::text[], $15::text[], $23::int4[]) AS d(ord, member, conn, node, tries)
			JOIN input i ON i.ord = d.ord
			JOIN ins ON ins.id = i.id
		)
		SELECT i.ord, i.id, ins.created_at, (SELECT count(*) FROM notified)
		FROM input i LEFT JOIN ins ON ins.id = i.id ORDER BY i.ord`)

// claimStatement is the claim: it leases each member's deliverable rows
// (unleased, lease run out, or leased to this node by a remote fast path
// and not yet tried: $5 with attempts 0) up to its limit, in id order,
// and returns them with their messages. takeOver adds the rows whose live
// leases a takeover may take.
func claimStatement(takeOver string) string {
	return `
		WITH picked AS (
			SELECT x.message_id, x.recipient_member_id, r.conn, x.prev_conn
			FROM unnest($1::text[], $2::text[], $3::int2[], $4::int4[]) AS r(member, conn, maxp, lim)
			CROSS JOIN LATERAL (
				SELECT d.message_id, d.recipient_member_id, d.lease_conn AS prev_conn FROM delivery d
				WHERE d.recipient_member_id = r.member
				  AND d.delivered_at IS NULL AND d.expired_at IS NULL
				  AND d.priority <= r.maxp AND d.expires_at > now()
				  AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now()
				       OR (d.lease_node = $5 AND d.attempts = 0)` + takeOver + `)
				ORDER BY d.message_id
				LIMIT r.lim
				FOR UPDATE SKIP LOCKED
			) x
		), upd AS (
			UPDATE delivery d
			SET lease_conn = p.conn, lease_node = $5, lease_expires_at = now() + $6::interval, attempts = d.attempts + 1
			FROM picked p
			WHERE d.message_id = p.message_id AND d.recipient_member_id = p.recipient_member_id
			RETURNING d.message_id, d.recipient_member_id, d.lease_conn, d.attempts, p.prev_conn
		)
		SELECT u.message_id, u.recipient_member_id, u.lease_conn, u.attempts, coalesce(u.prev_conn, ''),
		       m.mesh_id, m.sender_member_id, m.sender_pubkey, m.sender_name, m.target_spec,
		       m.priority, m.nonce, m.ciphertext, coalesce(m.client_message_id, ''), m.created_at
		FROM upd u JOIN message m ON m.id = u.message_id
		ORDER BY u.recipient_member_id, u.message_id`
}

// claimSQL leases deliverable rows (Claim).
var claimSQL = hotFast("claim", claimStatement(""))

// takeOverSQL leases deliverable rows and takes over the live leases of
// node incarnations not kept ($7) and of connections given up ($8)
// (TakeOver).
var takeOverSQL = hotFast("take over", claimStatement(`
				       OR (d.lease_expires_at > now() AND d.lease_node IS DISTINCT FROM $5
				           AND (d.lease_node IS NULL OR NOT (d.lease_node = ANY ($7::text[]))
				                OR d.lease_conn = ANY ($8::text[])))`))

// markDeliveredSQL marks acked rows delivered (MarkDelivered).
//
// "Neither delivered nor expired" is written num_nulls(…) = 2, not as
// delivery_pending's predicate: a predicate the partial index matches lets
// the planner walk the whole index as the outer side of a nested loop over
// the keys, and the connection's generic plan, made on its first run
// while the table was small, kept doing that as the table grew: a mark of
// 4,096 keys over 20,000 pending rows compared 80 million pairs and took
// 21 s (it timed out, was retried, and its rows were leased out again).
// Without it the only plan is one primary-key probe per key.
var markDeliveredSQL = hotFast("mark delivered", `
		UPDATE delivery d SET delivered_at = now(), lease_expires_at = NULL
		FROM unnest($1::int8[], $2::text[]) AS a(mid, member)
		WHERE d.message_id = a.mid AND d.recipient_member_id = a.member
		  AND num_nulls(d.delivered_at, d.expired_at) = 2
		  -- Fenced: a row another node incarnation took over ($3 not
		  -- holding its live lease) is not this marker's to mark.
		  AND ($3::text = '' OR d.lease_expires_at IS NULL OR d.lease_expires_at <= now() OR d.lease_node = $3::text)
		RETURNING d.message_id, d.recipient_member_id`)

// releaseLeasesSQL gives back leases (ReleaseLeases).
var releaseLeasesSQL = hotFast("release leases", `
		UPDATE delivery d SET lease_conn = NULL, lease_node = NULL, lease_expires_at = NULL
		FROM unnest($2::int8[], $3::text[]) AS a(mid, member)
		WHERE d.message_id = a.mid AND d.recipient_member_id = a.member
		  AND d.lease_conn = $1 AND d.delivered_at IS NULL`)

// notifySQL sends wake-up notifications (Notify).
var notifySQL = hotFast("notify", `SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)`)
