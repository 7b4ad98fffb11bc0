package store

import (
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/claudemesh/broker/internal/delivery"
)

// IsDataError reports whether err is Postgres refusing the values of a row
// rather than the statement or the connection: SQLSTATE class 22 (data
// exception: a NUL, invalid UTF-8, a value out of range), 23 (an integrity
// constraint) or 54 (a program limit, such as an index row too large). The
// same row fails again; the other rows of its batch do not.
func IsDataError(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	c := pgErr.Code
	return strings.HasPrefix(c, "22") || strings.HasPrefix(c, "23") || strings.HasPrefix(c, "54")
}

// IsBadValue reports whether err is a data exception (SQLSTATE class 22):
// the row's own text or numbers are unacceptable, as opposed to a
// constraint it broke.
func IsBadValue(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "22")
}

// RowsError is returned by a batch write of which some rows were not
// written while the others were (delivery.RowsError: the queue's
// contract). Check for it before IsUnavailable, which would take it for an
// outage. Its errors are classified (classify).
type RowsError = delivery.RowsError

// classified is a Postgres error with the delivery kind it is, for
// errors.Is, while errors.As still finds the Postgres error.
type classified struct{ err, kind error }

func (c *classified) Error() string   { return c.err.Error() }
func (c *classified) Unwrap() []error { return []error{c.err, c.kind} }

// classify wraps err with what it means to the delivery engine: the row's
// values refused (delivery.ErrRefused, delivery.ErrBadValue), or Postgres
// unreachable (delivery.ErrUnavailable).
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case IsBadValue(err):
		return &classified{err, delivery.ErrBadValue}
	case IsDataError(err):
		return &classified{err, delivery.ErrRefused}
	case IsUnavailable(err):
		return &classified{err, delivery.ErrUnavailable}
	}
	return err
}

// isolate retries rows [lo, hi) of a batch whose statement failed with
// err, so that only rows Postgres refuses fail. A data error is narrowed
// down by halves until each refused row stands alone: one bad row among n
// costs about 2·log2(n) statements and every other row is written. Any
// other error (Postgres unreachable, a timeout) ends the search at once and
// fails what is left: splitting would only multiply the failures. write
// runs the batch's statement over rows [lo, hi); fail records a row that
// was not written. Halves are written in order, so rows keep their order.
//
// Nothing here runs while batches succeed: the hot path is one statement.
func isolate(lo, hi int, err error, write func(lo, hi int) error, fail func(i int, err error)) {
	var stop error
	failAll := func(lo, hi int, err error) {
		err = classify(err)
		for i := lo; i < hi; i++ {
			fail(i, err)
		}
	}
	var walk func(lo, hi int, err error)
	walk = func(lo, hi int, err error) {
		if !IsDataError(err) {
			stop = err
		}
		if stop != nil || hi-lo == 1 {
			failAll(lo, hi, err)
			return
		}
		mid := lo + (hi-lo)/2
		for _, r := range [2][2]int{{lo, mid}, {mid, hi}} {
			if stop != nil {
				failAll(r[0], r[1], stop)
				continue
			}
			if err := write(r[0], r[1]); err != nil {
				walk(r[0], r[1], err)
			}
		}
	}
	walk(lo, hi, err)
}
