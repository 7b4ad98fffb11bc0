package claudecode

import (
	"os"
	"runtime"
	"strconv"
	"strings"
)

// shells are the processes a hook command may run under between Claude Code
// and claudemesh.
var shells = map[string]bool{
	"sh": true, "bash": true, "zsh": true, "dash": true, "fish": true, "ksh": true,
	"tcsh": true, "csh": true, "env": true, "timeout": true, "nice": true,
}

// SessionPID returns the id of the Claude Code process this process runs
// under: the nearest ancestor that is not a shell. An MCP server is started
// by Claude Code directly, a hook usually through a shell, so both find the
// same process and the broker can match the hook to the MCP server's
// session by (pid, cwd). certain is false where the process tree cannot be
// read (outside Linux); pid is then the parent's id.
func SessionPID() (pid int, certain bool) {
	return sessionPID("/proc", os.Getppid())
}

func sessionPID(procRoot string, ppid int) (int, bool) {
	if runtime.GOOS != "linux" {
		return ppid, false
	}
	pid := ppid
	for range 8 {
		comm, parent, ok := readStat(procRoot, pid)
		if !ok {
			return ppid, false
		}
		if !shells[comm] || parent <= 1 {
			return pid, true
		}
		pid = parent
	}
	return pid, true
}

// readStat reads a process's command name and parent id from
// /proc/<pid>/stat: "pid (comm) state ppid …", where comm may itself hold
// spaces and parentheses.
func readStat(procRoot string, pid int) (comm string, ppid int, ok bool) {
	data, err := os.ReadFile(procRoot + "/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", 0, false
	}
	s := string(data)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return "", 0, false
	}
	fields := strings.Fields(s[closing+1:])
	if len(fields) < 2 {
		return "", 0, false
	}
	ppid, err = strconv.Atoi(fields[1])
	if err != nil {
		return "", 0, false
	}
	return s[open+1 : closing], ppid, true
}
