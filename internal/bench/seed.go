package bench

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/store"
)

// seeded is a mesh created for a run, with the keys of its members.
type seeded struct {
	meshID  string
	slug    string
	members []client.Identity
	meshKey *[e2e.MeshKeySize]byte // the mesh root key, for broadcasts
}

// seedMesh creates a mesh and enrols members with fresh ed25519 keys,
// through the broker's own admin functions (the path `broker admin`
// takes), with at most parallel enrolments in flight. On error the mesh
// is deleted again.
func seedMesh(ctx context.Context, st *store.Store, name string, members, parallel int) (*seeded, error) {
	mc, err := admin.CreateMesh(ctx, st, name, "")
	if err != nil {
		return nil, fmt.Errorf("create mesh: %w", err)
	}
	s := &seeded{meshID: mc.MeshID, slug: mc.Slug, members: make([]client.Identity, members)}
	ok := false
	defer func() {
		if !ok {
			_, _ = deleteMeshes(st, []string{s.meshID})
		}
	}()
	mesh, err := st.GetMesh(ctx, mc.MeshID)
	if err != nil {
		return nil, fmt.Errorf("read mesh: %w", err)
	}
	if s.meshKey, err = e2e.ParseMeshKeyHex(mesh.RootKey); err != nil {
		return nil, fmt.Errorf("mesh root key: %w", err)
	}
	errs := make([]error, members)
	sem := make(chan struct{}, max(parallel, 1))
	var wg sync.WaitGroup
	for i := range members {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if ctx.Err() != nil {
				errs[i] = ctx.Err()
				return
			}
			pub, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				errs[i] = err
				return
			}
			m, err := admin.AddMember(ctx, st, mc.MeshID, hex.EncodeToString(pub), fmt.Sprintf("bench-%d", i), "member")
			if err != nil {
				errs[i] = fmt.Errorf("add member %d: %w", i, err)
				return
			}
			s.members[i] = client.Identity{MeshID: mc.MeshID, MemberID: m.ID, Priv: priv}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	ok = true
	return s, nil
}

// deleteMeshes deletes the run's meshes (members, messages and audit
// events go with them) through the admin path. It runs on its own
// context: cleanup must happen after an interrupted run too. The nodes
// may still be marking deliveries and writing audit events for the mesh,
// so a deletion that loses a deadlock or serialization conflict to them is
// retried a few times.
func deleteMeshes(st *store.Store, ids []string) (retries int, _ error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var errs []error
	for _, id := range ids {
		err := admin.DeleteMesh(ctx, st, id)
		for attempt := 1; retryable(err) && attempt < 5; attempt++ {
			retries++
			t := time.NewTimer(time.Duration(attempt) * 250 * time.Millisecond)
			select {
			case <-t.C:
			case <-ctx.Done():
			}
			t.Stop()
			err = admin.DeleteMesh(ctx, st, id)
		}
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			errs = append(errs, fmt.Errorf("delete mesh %s: %w", id, err))
		}
	}
	return retries, errors.Join(errs...)
}

// retryable reports a transaction that Postgres aborted to resolve a
// deadlock (40P01) or a serialization conflict (40001).
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001")
}
