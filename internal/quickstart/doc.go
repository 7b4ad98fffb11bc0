// Package quickstart holds the test of README.md's "Two Claude Code
// sessions in two minutes": scripts/two-sessions.sh runs that section's
// commands line by line, as written, against a `broker dev` of its own with
// two scratch HOME folders, and checks what each line prints. The tests
// here run the script (so `make test` does), check what it leaves behind
// (the files install wrote, no process, no Postgres), and prove that it
// fails when a step breaks.
package quickstart
