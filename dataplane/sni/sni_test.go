package sni

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// hello captures the ClientHello crypto/tls sends for serverName.
func hello(t testing.TB, serverName string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		c := tls.Client(b, &tls.Config{ServerName: serverName, InsecureSkipVerify: serverName == ""})
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		_ = c.Handshake()
		b.Close()
	}()
	var buf bytes.Buffer
	_ = a.SetReadDeadline(time.Now().Add(2 * time.Second))
	tmp := make([]byte, 4096)
	for {
		n, err := a.Read(tmp)
		buf.Write(tmp[:n])
		if _, _, perr := Read(bytes.NewReader(buf.Bytes())); perr == nil || errors.Is(perr, ErrNoSNI) || err != nil {
			break
		}
	}
	return buf.Bytes()
}

func TestRealClientHellos(t *testing.T) {
	for _, name := range []string{"9080.echo.default.east.test.meshfed", "stable.9080.echo.default.east.test.meshfed", "Example.COM"} {
		raw := hello(t, name)
		got, read, err := Read(bytes.NewReader(append(raw, "after"...)))
		if err != nil || got != strings.ToLower(name) {
			t.Errorf("%s: got %q, %v", name, got, err)
		}
		if !bytes.Equal(read, raw) {
			t.Errorf("%s: read %d bytes, the hello has %d: the bytes after it must stay unread", name, len(read), len(raw))
		}
	}
}

func TestRefusals(t *testing.T) {
	raw := hello(t, "9080.echo.default.east.test.meshfed")
	big := append([]byte{22, 3, 1, 0x40, 0x00}, make([]byte, 0x4000)...)
	cases := map[string]struct {
		in   []byte
		want error
	}{
		"http":         {[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ErrNotTLS},
		"truncated":    {raw[:len(raw)/2], ErrMalformed},
		"no sni":       {hello(t, ""), ErrNoSNI},
		"oversized":    {big, ErrTooLarge},
		"empty record": {[]byte{22, 3, 1, 0, 0}, ErrMalformed},
	}
	for name, c := range cases {
		if _, _, err := Read(bytes.NewReader(c.in)); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
	}
}

// FuzzRead: no input panics, reads past what it returns, yields a name
// that is not a plain DNS name, or parses differently from Parse.
func FuzzRead(f *testing.F) {
	f.Add(hello(f, "9080.echo.default.east.test.meshfed"))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		name, raw, err := Read(bytes.NewReader(in))
		if len(raw) > len(in) || !bytes.Equal(raw, in[:len(raw)]) {
			t.Fatalf("raw is not a prefix of the input")
		}
		if len(raw) > MaxSize+5 {
			t.Fatalf("read %d bytes, more than the limit", len(raw))
		}
		// Parse over the same bytes, as an event loop calls it, agrees.
		pname, pn, perr := Parse(in)
		switch {
		case errors.Is(perr, ErrIncomplete):
			if pn <= len(in) || pn > MaxSize || err == nil {
				t.Fatalf("Parse wants %d bytes of %d (Read: %v)", pn, len(in), err)
			}
		case err == nil && (perr != nil || pname != name || pn != len(raw)):
			t.Fatalf("Parse gave %q, %d, %v; Read %q, %d bytes", pname, pn, perr, name, len(raw))
		case err != nil && perr == nil:
			t.Fatalf("Parse accepted what Read refused: %v", err)
		}
		if err == nil {
			if _, cerr := checkName(name); cerr != nil {
				t.Fatalf("returned a name that does not check: %q", name)
			}
		} else if !errors.Is(err, io.EOF) && !errors.Is(err, ErrNotTLS) && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrNoSNI) {
			t.Fatalf("unexpected error kind: %v", err)
		}
	})
}
