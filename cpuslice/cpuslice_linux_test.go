package cpuslice

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestSetEveryThreadNowAndLater(t *testing.T) {
	// A thread with a nice value of its own, which Set must keep.
	const nice = 7
	niced, release := make(chan int), make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		tid := unix.Gettid()
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil {
			t.Error(err)
		}
		niced <- tid
		<-release
	}()
	nicedTID := <-niced
	defer close(release)

	const want = 300 * time.Microsecond
	granted, err := Set(want)
	if errors.Is(err, ErrUnsupported) {
		// What a user of an older kernel sees: told so, and the kernel
		// indeed reports no slice for the thread.
		if a, gerr := get(0); gerr != nil || a.runtime != 0 {
			t.Fatalf("Set says %v, but the kernel reports a slice of %d ns (%v)", err, a.runtime, gerr)
		}
		return
	}
	if err != nil || granted != want {
		t.Fatalf("Set(%v) = %v, %v; want %v granted", want, granted, err, want)
	}
	all, err := Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for i, got := range all {
		if got != want {
			t.Errorf("thread %d of %d has a slice of %v; want %v", i+1, len(all), got, want)
		}
	}
	if a, err := get(nicedTID); err != nil || a.nice != nice {
		t.Errorf("a thread's nice value is %d after Set (%v); it was %d", a.nice, err, nice)
	}

	// Threads made after Set: lock more goroutines to threads than there
	// are, so the runtime has to make some.
	more := len(all) + 2
	var wg sync.WaitGroup
	slices := make(chan time.Duration, more)
	hold := make(chan struct{})
	for range more {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			a, err := get(0)
			if err != nil {
				t.Error(err)
			}
			slices <- time.Duration(a.runtime)
			<-hold
		}()
	}
	for range more {
		if got := <-slices; got != want {
			t.Errorf("a thread made after Set has a slice of %v; want %v", got, want)
		}
	}
	// Counted while the locked goroutines hold their threads: each ends
	// with its goroutine.
	if now, _ := threads("self"); len(now) <= len(all) {
		t.Errorf("the test meant to make threads: %d before, %d after", len(all), len(now))
	}
	close(hold)
	wg.Wait()
}

func TestSetClampsAndRefuses(t *testing.T) {
	if _, err := Set(0); err == nil {
		t.Error("Set(0) took it; want an error")
	}
	granted, err := Set(time.Microsecond)
	if errors.Is(err, ErrUnsupported) {
		return // TestSetEveryThreadNowAndLater checks the kernel says so
	}
	if err != nil || granted != Min {
		t.Errorf("Set(1µs) = %v, %v; want the kernel's floor %v", granted, err, Min)
	}
}
