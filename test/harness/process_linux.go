package harness

import "syscall"

// ProcAttr puts a started process in a group of its own, and has Linux
// kill it if the test binary dies before its cleanups run.
func ProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
