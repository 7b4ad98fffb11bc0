// Package migrations embeds the broker's schema migrations (goose format).
// They are applied by `broker migrate` and at node start-up under a Postgres
// advisory lock, so several nodes starting together migrate once.
package migrations

import "embed"

// FS holds the *.sql migration files.
//
//go:embed *.sql
var FS embed.FS
