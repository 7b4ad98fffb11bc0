package bench

import (
	"fmt"
	"syscall"
)

// RaiseFDLimit raises this process's soft RLIMIT_NOFILE to its hard limit
// and returns the new soft limit. Setting it explicitly (rather than
// relying on the Go runtime's own raise) makes processes started from here,
// such as spawned broker nodes, inherit the raised limit too.
func RaiseFDLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("setrlimit: %w", err)
		}
	}
	return lim.Cur, nil
}
