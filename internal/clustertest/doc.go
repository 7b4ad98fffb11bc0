// Package clustertest holds the multi-node tests: several broker nodes (in
// this process, or as separate processes) on one Postgres.
package clustertest
