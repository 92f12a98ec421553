package cpuslice

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// attr is the kernel's struct sched_attr as first defined
// (SCHED_ATTR_SIZE_VER0), without the utilization clamps.
type attr struct {
	size, policy              uint32
	flags                     uint64
	nice                      int32
	priority                  uint32
	runtime, deadline, period uint64
}

const resetOnFork = 0x01 // SCHED_FLAG_RESET_ON_FORK

// Set asks for slice on every thread of the process; threads made later
// inherit it from the one that makes them. Each thread keeps its policy
// and nice value; a thread that is not under SCHED_OTHER or SCHED_BATCH
// (real-time, say) is left as it is and named in the error. Set returns
// the slice the kernel granted (clamped to Min..Max), or ErrUnsupported.
func Set(slice time.Duration) (time.Duration, error) {
	if slice <= 0 {
		return 0, fmt.Errorf("CPU slice %v: want a positive duration (%v to %v)", slice, Min, Max)
	}
	var granted time.Duration
	var errs []error
	done := map[int]bool{}
	// A thread listed here may make another before it is set: look again
	// until a pass finds none new.
	for pass := 0; pass < 5; pass++ {
		tids, err := threads("self")
		if err != nil {
			return 0, err
		}
		fresh := 0
		for _, tid := range tids {
			if done[tid] {
				continue
			}
			fresh++
			done[tid] = true
			g, err := setThread(tid, slice)
			switch {
			case errors.Is(err, unix.ESRCH): // it ended meanwhile
			case errors.Is(err, ErrUnsupported):
				return 0, err
			case err != nil:
				errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
			default:
				granted = g
			}
		}
		if fresh == 0 {
			break
		}
	}
	return granted, errors.Join(errs...)
}

// Of returns the slice of each thread of process pid (0 for a thread
// the kernel gives none, or under a real-time policy).
func Of(pid int) ([]time.Duration, error) {
	tids, err := threads(strconv.Itoa(pid))
	if err != nil {
		return nil, err
	}
	out := make([]time.Duration, 0, len(tids))
	for _, tid := range tids {
		a, err := get(tid)
		if errors.Is(err, unix.ESRCH) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("thread %d: %w", tid, err)
		}
		out = append(out, time.Duration(a.runtime))
	}
	return out, nil
}

// threads lists the threads of the process ("self" or a PID).
func threads(pid string) ([]int, error) {
	ents, err := os.ReadDir("/proc/" + pid + "/task")
	if err != nil {
		return nil, fmt.Errorf("list the threads of process %s: %w", pid, err)
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// setThread sets one thread's slice and returns what the kernel made of it.
func setThread(tid int, slice time.Duration) (time.Duration, error) {
	a, err := get(tid)
	if err != nil {
		return 0, err
	}
	if a.policy != unix.SCHED_NORMAL && a.policy != unix.SCHED_BATCH {
		return 0, fmt.Errorf("scheduling policy %d is not SCHED_OTHER or SCHED_BATCH: left as it is", a.policy)
	}
	// A fair thread's slice reads back as 0 where the kernel has none to
	// give.
	if a.runtime == 0 {
		return 0, ErrUnsupported
	}
	a.runtime, a.flags = uint64(slice), a.flags&resetOnFork
	if _, _, e := unix.Syscall(unix.SYS_SCHED_SETATTR, uintptr(tid), uintptr(unsafe.Pointer(&a)), 0); e != 0 {
		return 0, fmt.Errorf("sched_setattr: %w", e)
	}
	if a, err = get(tid); err != nil {
		return 0, err
	}
	return time.Duration(a.runtime), nil
}

func get(tid int) (attr, error) {
	var a attr
	if _, _, e := unix.Syscall6(unix.SYS_SCHED_GETATTR, uintptr(tid), uintptr(unsafe.Pointer(&a)), unsafe.Sizeof(a), 0, 0, 0); e != 0 {
		return a, fmt.Errorf("sched_getattr: %w", e)
	}
	a.size = uint32(unsafe.Sizeof(a))
	return a, nil
}
