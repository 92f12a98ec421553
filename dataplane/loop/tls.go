package loop

import (
	"crypto/tls"
	"net"
	"sync"
	"time"
)

// A TLS record holds at most 16 KiB of data. crypto/tls writes each
// record in a system call of its own, reads little more than the record
// it needs, and returns one record a Read: a 128 KiB copy-buffer write
// leaves in eight writes on the TLS side, and the other end hands it to
// the app in eight writes. TLSConn moves bulk data a buffer at a time
// instead: what one Write encrypts leaves in one system call, and a Read
// that gets a full record also takes the records already in hand (not
// waiting for more). Small messages pass as before.
const maxRecord = 16 << 10

// TLSConn is a TLS connection over a batchConn: what a relay loop can
// carry once its handshake is done.
type TLSConn struct {
	*tls.Conn
	raw *batchConn
}

// TLSClient starts TLS over raw as its client, batched.
func TLSClient(raw net.Conn, tc *tls.Config) *TLSConn {
	b := &batchConn{Conn: raw}
	return &TLSConn{Conn: tls.Client(b, tc), raw: b}
}

// TLSServer starts TLS over raw as its server, batched.
func TLSServer(raw net.Conn, tc *tls.Config) *TLSConn {
	b := &batchConn{Conn: raw}
	return &TLSConn{Conn: tls.Server(b, tc), raw: b}
}

// Write encrypts p and sends its records in one write.
func (c *TLSConn) Write(p []byte) (int, error) {
	if len(p) <= maxRecord {
		return c.Conn.Write(p)
	}
	c.raw.hold()
	n, err := c.Conn.Write(p)
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// longAgo is a read deadline that has passed: a read then takes only what
// crypto/tls already holds.
var longAgo = time.Unix(1, 0)

// Read returns one record's data, and after a full record also the
// records crypto/tls has already read off the network, up to len(p).
func (c *TLSConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil || n < maxRecord || n == len(p) {
		return n, err
	}
	_ = c.Conn.SetReadDeadline(longAgo)
	for n < len(p) {
		// The deadline ends this at the first record still on the
		// network; any other error is crypto/tls's to give again on
		// the next Read.
		m, err := c.Conn.Read(p[n:])
		n += m
		if err != nil {
			break
		}
	}
	_ = c.Conn.SetReadDeadline(time.Time{})
	return n, nil
}

// batchConn holds what is written between hold and flush (in buf, nil
// otherwise), and sends it in one write at flush. crypto/tls may write from the reading goroutine
// as well (a key update): mu keeps the order. It reads ahead up to
// readAhead bytes a system call (crypto/tls asks for little more than a
// record), into a buffer it holds only while it has bytes in it.
type batchConn struct {
	net.Conn
	mu  sync.Mutex
	buf *[]byte

	in           *[]byte
	inPos, inEnd int
}

const readAhead = 64 << 10

var readBuffers = sync.Pool{New: func() any { b := make([]byte, readAhead); return &b }}

func (b *batchConn) Read(p []byte) (int, error) {
	if b.in == nil {
		if len(p) >= readAhead {
			return b.Conn.Read(p)
		}
		in := readBuffers.Get().(*[]byte)
		n, err := b.Conn.Read(*in)
		if n == 0 {
			readBuffers.Put(in)
			return 0, err
		}
		// An error with data comes again on the next read.
		b.in, b.inPos, b.inEnd = in, 0, n
	}
	n := copy(p, (*b.in)[b.inPos:b.inEnd])
	b.inPos += n
	if b.inPos == b.inEnd {
		readBuffers.Put(b.in)
		b.in = nil
	}
	return n, nil
}

var batchBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 136<<10); return &b }}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf == nil {
		return b.Conn.Write(p)
	}
	*b.buf = append(*b.buf, p...)
	return len(p), nil
}

func (b *batchConn) hold() {
	b.mu.Lock()
	b.buf = batchBuffers.Get().(*[]byte)
	b.mu.Unlock()
}

func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	buf := b.buf
	b.buf = nil
	_, err := b.Conn.Write(*buf)
	*buf = (*buf)[:0]
	batchBuffers.Put(buf)
	return err
}

// release returns the read-ahead buffer when the connection is done with.
func (b *batchConn) release() {
	if b.in != nil {
		readBuffers.Put(b.in)
		b.in = nil
	}
}
