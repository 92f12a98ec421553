package harness

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// ClientHello is the first record crypto/tls sends for sni: what a
// gateway routes by, for tests that pass it without a TLS client.
func ClientHello(t testing.TB, sni string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		_ = tls.Client(b, &tls.Config{ServerName: sni}).Handshake()
		b.Close()
	}()
	_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(a, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(a, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

// TCPEcho echoes each connection to its end, then closes: it sees the
// caller's half-close only if a proxy in between passes it on.
func TCPEcho(t testing.TB) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().(*net.TCPAddr)
}
