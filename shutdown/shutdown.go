// Package shutdown turns SIGINT and SIGTERM into a cancelled context, so
// long-running commands stop cleanly; a second signal exits at once.
package shutdown

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// Context ends on the first SIGINT/SIGTERM; call stop when done.
func Context() (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
		cancel()
		<-ch
		fmt.Fprintln(os.Stderr, "second signal: exiting now")
		os.Exit(130)
	}()
	return ctx, func() { signal.Stop(ch); cancel() }
}
