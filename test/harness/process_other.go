//go:build !linux

package harness

import "syscall"

// ProcAttr puts a started process in a group of its own. Only Linux can
// kill it when the test binary dies; elsewhere the cleanups must run.
func ProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
