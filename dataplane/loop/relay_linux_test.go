package loop

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestRelayDrivesTLSOnALoop: a plain client's bytes cross a connection
// relayed on an event loop whose other side is TLS, to a TLS echo server
// and back. Both ends read slowly, so the loop's writes meet full sockets
// both ways; the client's half-close reaches the server as close_notify,
// and the server's comes back as the end of the stream. The loop relies on
// crypto/tls going on after a read that found nothing: were that error
// kept, this would fail.
func TestRelayDrivesTLSOnALoop(t *testing.T) {
	cert := selfSigned(t)
	echoLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echoLn.Close()
	go func() {
		raw, err := echoLn.Accept()
		if err != nil {
			return
		}
		c := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{cert}})
		defer c.Close()
		_, _ = slowCopy(c, c)
		_ = c.CloseWrite()
	}()

	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer appLn.Close()
	r := NewRelayer(RelayOptions{Loops: 1, Tracker: &Tracker{}, Gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "loops"}), Logger: slog.New(slog.DiscardHandler)})
	defer r.Stop()
	relayed := make(chan error, 1)
	go func() {
		a, err := appLn.Accept()
		if err != nil {
			relayed <- err
			return
		}
		raw, err := net.Dial("tcp", echoLn.Addr().String())
		if err != nil {
			a.Close()
			relayed <- err
			return
		}
		b := TLSClient(raw, &tls.Config{ServerName: "batch", InsecureSkipVerify: true})
		if err := b.Handshake(); err != nil {
			a.Close()
			raw.Close()
			relayed <- err
			return
		}
		r.Relay(a, b)
		relayed <- nil
	}()

	c, err := net.Dial("tcp", appLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	sent := make([]byte, 8<<20)
	_, _ = rand.Read(sent)
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(sent)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		written <- err
	}()
	var got bytes.Buffer
	if _, err := slowCopy(&got, c); err != nil {
		t.Fatalf("read after %d of %d bytes: %v", got.Len(), len(sent), err)
	}
	if err := <-written; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got.Bytes(), sent) {
		t.Fatalf("got %d bytes back, not the %d sent", got.Len(), len(sent))
	}
	if err := <-relayed; err != nil {
		t.Fatal(err)
	}
}

// slowCopy copies src to dst 16 KiB at a time, pausing between reads,
// until src ends.
func slowCopy(dst io.Writer, src io.Reader) (int64, error) {
	buf := make([]byte, 16<<10)
	var n int64
	for {
		m, err := src.Read(buf)
		if m > 0 {
			if _, err := dst.Write(buf[:m]); err != nil {
				return n, err
			}
			n += int64(m)
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		time.Sleep(50 * time.Microsecond)
	}
}
