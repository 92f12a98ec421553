// Package cpuslice asks Linux's scheduler for a short time slice for every
// thread of the process. Since Linux 6.12 the fair scheduler (EEVDF) lets
// a thread name the slice it wants (sched_attr.sched_runtime, 0.1–100 ms;
// the default here is 0.7 ms times 1 + log2 of the CPUs), and a thread
// with a shorter slice than the one running preempts it when it wakes.
// A proxy's threads wake for a few microseconds of work per event; with
// the default slice a wakeup can wait behind a CPU-bound neighbour (a TLS
// handshake, a compression job) for most of a millisecond.
package cpuslice

import (
	"errors"
	"time"
)

// ErrUnsupported: the kernel takes no slice from a thread (before Linux
// 6.12, or not Linux).
var ErrUnsupported = errors.New("this kernel takes no custom CPU slices (EEVDF's sched_runtime: Linux 6.12 or later)")

// Min and Max: the kernel clamps a slice to them.
const (
	Min = 100 * time.Microsecond
	Max = 100 * time.Millisecond
)
