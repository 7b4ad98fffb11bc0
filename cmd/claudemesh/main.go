// Command claudemesh connects Claude Code sessions through a claudemesh
// broker cluster: identity keys, invites, end-to-end encrypted messages,
// peers and status, Claude Code hooks, and an MCP server. See internal/cli.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/claudemesh/broker/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], cli.OSEnv())
	stop()
	os.Exit(code)
}
