package loop

import (
	"io"
	"net"
	"sync"
)

// Copy buffers: every direction of a connection starts with a small one;
// one whose reads fill it (bulk data) moves to a large one, so each read
// brings more: a plain-text read, more bytes per system call; a TLS read,
// the records already read off the network (batchedTLS).
var (
	smallBuffers = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}
	largeBuffers = sync.Pool{New: func() any { b := make([]byte, 128<<10); return &b }}
)

// copyConn copies src to dst until src ends or either fails.
func copyConn(dst io.Writer, src net.Conn) {
	pool := &smallBuffers
	buf := pool.Get().(*[]byte)
	defer func() { pool.Put(buf) }()
	var grow bool
	switch src.(type) {
	case *net.TCPConn, *TLSConn:
		grow = true
	}
	for {
		n, err := src.Read(*buf)
		if n > 0 {
			if _, err := dst.Write((*buf)[:n]); err != nil {
				return
			}
			if grow && n == len(*buf) {
				pool.Put(buf)
				pool, grow = &largeBuffers, false
				buf = pool.Get().(*[]byte)
			}
		}
		if err != nil {
			return
		}
	}
}

// pipe copies both ways until both sides are done, passing half-closes on.
// One direction runs on the caller's goroutine.
func pipe(a, b net.Conn) {
	done := make(chan struct{})
	cp := func(dst, src net.Conn) {
		copyConn(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	go func() { cp(a, b); close(done) }()
	cp(b, a)
	<-done
	a.Close()
	b.Close()
}
