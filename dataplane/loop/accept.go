package loop

import (
	"errors"
	"log/slog"
	"net"
	"time"
)

// Accept hands ln's connections to handle until ln is closed. Any other
// error (out of file descriptors, most likely) pauses it, 5 ms at first,
// doubling up to 1 s, as net/http does: callers wait in the kernel's queue
// meanwhile, and are served once descriptors are free.
func Accept(ln net.Listener, log *slog.Logger, handle func(net.Conn)) {
	var pause time.Duration
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			if pause == 5*time.Millisecond || pause == time.Second {
				log.Error("could not accept a connection; trying again shortly", "listener", ln.Addr(), "err", err, "in", pause)
			}
			time.Sleep(pause)
			continue
		}
		pause = 0
		handle(c)
	}
}
