package devcluster

import "syscall"

// childSysProcAttr puts a node process in its own process group, so that
// the terminal's Ctrl-C and hang-up reach only the dev cluster, which stops
// its nodes in order; Pdeathsig stops the node should the dev cluster be
// killed outright.
func childSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
