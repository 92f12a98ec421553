package loop

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countingConn counts the writes that reach the network.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// selfSigned is a certificate for the name "batch".
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"batch"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestBatchedTLS: bulk data crosses a real TLS connection intact, each
// large write leaving in one system call, reads taking several records
// at once, and the end of the stream coming after the last byte.
func TestBatchedTLS(t *testing.T) {
	cert := selfSigned(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	const writes, size = 64, 128 << 10
	want := make([]byte, writes*size)
	_, _ = rand.Read(want)
	type result struct {
		got       []byte
		reads     int
		largest   int
		err       error
		afterLast error
	}
	results := make(chan result, 1)
	go func() {
		var r result
		defer func() { results <- r }()
		raw, err := ln.Accept()
		if err != nil {
			r.err = err
			return
		}
		defer raw.Close()
		c := TLSServer(raw, &tls.Config{Certificates: []tls.Certificate{cert}})
		buf := make([]byte, size)
		for {
			n, err := c.Read(buf)
			r.got = append(r.got, buf[:n]...)
			r.reads++
			r.largest = max(r.largest, n)
			if err == io.EOF {
				_, r.afterLast = c.Read(buf)
				return
			}
			if err != nil {
				r.err = err
				return
			}
		}
	}()

	tcp, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	raw := &countingConn{Conn: tcp}
	c := TLSClient(raw, &tls.Config{ServerName: "batch", InsecureSkipVerify: true})
	defer c.Close()
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	before := raw.writes.Load()
	for i := range writes {
		if n, err := c.Write(want[i*size : (i+1)*size]); n != size || err != nil {
			t.Fatalf("write %d: %d bytes, %v", i, n, err)
		}
	}
	if got := raw.writes.Load() - before; got != writes {
		t.Errorf("%d writes of %d KiB reached the network in %d system calls; want one each", writes, size>>10, got)
	}
	if err := c.Close(); err != nil { // close_notify, then the socket
		t.Fatal(err)
	}

	r := <-results
	if r.err != nil {
		t.Fatalf("reading: %v", r.err)
	}
	if !bytes.Equal(r.got, want) {
		t.Fatalf("got %d bytes, not the %d sent", len(r.got), len(want))
	}
	if r.afterLast != io.EOF {
		t.Errorf("a read after the end gave %v; want EOF again", r.afterLast)
	}
	t.Logf("%d MiB in %d reads, the largest %d KiB", len(want)>>20, r.reads, r.largest>>10)
	if r.largest <= maxRecord {
		t.Errorf("no read took more than one %d KiB record", maxRecord>>10)
	}
}
