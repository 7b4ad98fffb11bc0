package store

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// fakeBatch is a statement over rows that fails with a data error when its
// range holds a bad row, and with down once the statement budget is spent.
type fakeBatch struct {
	bad        map[int]bool
	statements int
	budget     int // statements before Postgres "goes away"; 0: never
	written    []int
}

var errDown = errors.New("connection refused")

func (b *fakeBatch) write(lo, hi int) error {
	b.statements++
	if b.budget > 0 && b.statements > b.budget {
		return errDown
	}
	for i := lo; i < hi; i++ {
		if b.bad[i] {
			return &pgconn.PgError{Code: "22021", Message: "invalid byte sequence"}
		}
	}
	for i := lo; i < hi; i++ {
		b.written = append(b.written, i)
	}
	return nil
}

// One bad row among 512 costs about 2·log2(512) statements; every other
// row is written once, in order; only the bad row fails.
func TestIsolateBisects(t *testing.T) {
	b := &fakeBatch{bad: map[int]bool{300: true}}
	first := b.write(0, 512)
	failed := map[int]error{}
	isolate(0, 512, first, b.write, func(i int, err error) { failed[i] = err })
	if len(failed) != 1 || !IsDataError(failed[300]) {
		t.Fatalf("failed %v, want only row 300", failed)
	}
	if len(b.written) != 511 {
		t.Fatalf("%d rows written, want 511", len(b.written))
	}
	for i := 1; i < len(b.written); i++ {
		if b.written[i] <= b.written[i-1] {
			t.Fatalf("rows written out of order: %v", b.written)
		}
	}
	if b.statements > 1+2*9 {
		t.Fatalf("%d statements for one bad row in 512", b.statements)
	}
}

// Postgres going away mid-search stops it: the rest fail with the outage
// error (not split further, not reported as refused).
func TestIsolateStopsWhenUnavailable(t *testing.T) {
	b := &fakeBatch{bad: map[int]bool{5: true, 200: true}, budget: 3}
	first := b.write(0, 256)
	failed := map[int]error{}
	isolate(0, 256, first, b.write, func(i int, err error) { failed[i] = err })
	if b.statements > 4 {
		t.Fatalf("%d statements: the search went on after the outage", b.statements)
	}
	if len(failed)+len(b.written) != 256 {
		t.Fatalf("%d failed + %d written, want 256", len(failed), len(b.written))
	}
	down := 0
	for _, err := range failed {
		if errors.Is(err, errDown) {
			down++
		}
	}
	if down == 0 || !errors.Is(failed[200], errDown) {
		t.Fatalf("failed rows %d, %d of them with the outage error; row 200 must fail with it", len(failed), down)
	}
}
