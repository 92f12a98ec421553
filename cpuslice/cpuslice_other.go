//go:build !linux

package cpuslice

import "time"

// Set returns ErrUnsupported: only Linux takes a slice from a thread.
func Set(time.Duration) (time.Duration, error) { return 0, ErrUnsupported }

// Of returns ErrUnsupported: only Linux keeps a slice per thread.
func Of(int) ([]time.Duration, error) { return nil, ErrUnsupported }
