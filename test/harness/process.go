package harness

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Process is a child process whose output goes to a log file.
type Process struct {
	Name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	mu   sync.Mutex
	err  error
}

// Start runs bin with args; the process is killed when the test ends, and
// its log is printed if the test failed.
func Start(t testing.TB, name, bin string, args ...string) *Process {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = ProcAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Process{Name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("---- log of %s ----\n%s", name, p.Log())
		}
	})
	return p
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Log returns what the process printed so far.
func (p *Process) Log() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Kill sends SIGKILL and waits for the process to go.
func (p *Process) Kill() { p.Signal(syscall.SIGKILL) }

// Signal sends sig and, for SIGKILL, waits for the exit.
func (p *Process) Signal(sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	if sig == syscall.SIGKILL {
		<-p.done
	}
}

// FreePort returns a loopback TCP address nothing listens on right now.
// Ports come from below Linux's ephemeral range (32768 and up), where the
// outgoing connections of other processes cannot take them between this
// check and the listen; none is handed out twice in one test process.
func FreePort(t testing.TB) string {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		port := 20000 + rand.IntN(12000)
		if portsGiven[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		l.Close()
		portsGiven[port] = true
		return addr
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// Eventually polls cond every 50ms until it returns nil or the deadline
// passes, then fails the test with the last error.
func Eventually(t testing.TB, within time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Run runs a command to completion and returns its combined output.
func Run(bin string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// Memory returns a /proc/<pid>/status size in bytes: field "VmRSS" (resident
// now) or "VmHWM" (the peak).
func Memory(pid int, field string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field+":" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no %s for pid %d", field, pid)
}

// CPUTime is the user plus system CPU time the processes have used so far
// together (from /proc, in clock ticks of 10 ms).
func CPUTime(t testing.TB, pids ...int) time.Duration {
	t.Helper()
	var sum time.Duration
	for _, pid := range pids {
		d, err := cpuTime(pid)
		if err != nil {
			t.Fatal(err)
		}
		sum += d
	}
	return sum
}

// stat is /proc/PID/stat's fields after the command name (which may hold
// spaces): the process state first.
func stat(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(f) < 13 {
		return nil, fmt.Errorf("short /proc/%d/stat", pid)
	}
	return f, nil
}

func cpuTime(pid int) (time.Duration, error) {
	f, err := stat(pid)
	if err != nil {
		return 0, err
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// Sched is what the kernel counted for a process's threads: CPU time (to
// the nanosecond, unlike CPUTime's ticks), how many times a thread was put
// on a CPU, which is about how many times it woke up, and page faults
// (minor: a page first touched or given back to the kernel before).
type Sched struct {
	CPU    time.Duration
	Slices int64
	Faults int64
}

// SchedStat sums /proc/PID/task/*/schedstat over pid's threads (threads
// that have ended are not counted); the page faults are the process's, from
// /proc/PID/stat.
func SchedStat(t testing.TB, pid int) Sched {
	t.Helper()
	files, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(files) == 0 {
		t.Fatalf("scheduler stats of process %d: %v (none found)", pid, err)
	}
	var s Sched
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		var run, wait, slices int64
		if _, err := fmt.Sscan(string(data), &run, &wait, &slices); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		s.CPU += time.Duration(run)
		s.Slices += slices
	}
	f, err := stat(pid)
	if err == nil {
		s.Faults, err = strconv.ParseInt(f[7], 10, 64)
	}
	if err != nil {
		t.Fatalf("page faults of process %d: %v", pid, err)
	}
	return s
}
