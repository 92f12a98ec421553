// Package sni reads the server name (SNI) from a TLS ClientHello
// without decrypting anything, so a gateway can route a connection and pass
// its bytes on unchanged.
package sni

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// MaxSize bounds how many bytes a ClientHello may take, records included.
// Real ones are well under 2 KiB (a post-quantum key share adds about 1.2
// KiB); anything larger is refused rather than buffered.
const MaxSize = 16 << 10

// Errors a caller can count apart.
var (
	ErrNotTLS    = errors.New("not a TLS handshake")
	ErrMalformed = errors.New("malformed ClientHello")
	ErrTooLarge  = fmt.Errorf("ClientHello larger than %d bytes", MaxSize)
	ErrNoSNI     = errors.New("ClientHello names no server (no SNI)")
)

// ErrIncomplete: the bytes so far are a valid start of a ClientHello, and
// more are needed.
var ErrIncomplete = errors.New("incomplete ClientHello")

// Read reads one ClientHello from r, across as many handshake records as it
// takes, and returns the server name and every byte read (to be replayed
// to the upstream). It reads no byte past the hello.
func Read(r io.Reader) (serverName string, raw []byte, err error) {
	for {
		name, n, err := Parse(raw)
		if !errors.Is(err, ErrIncomplete) {
			return name, raw, err
		}
		start := len(raw)
		raw = append(raw, make([]byte, n-start)...)
		m, err := io.ReadFull(r, raw[start:])
		raw = raw[:start+m]
		if err != nil {
			return "", raw, readErr(err, len(raw))
		}
	}
}

// Parse reads a ClientHello from the start of b, for callers that collect
// bytes themselves. It returns the server name and how many bytes the
// hello's records take; with ErrIncomplete, n is how many bytes b must hold
// at least before it can say more (never more than MaxSize). Anything that
// is not the start of a ClientHello is refused as soon as its first bytes
// show it.
func Parse(b []byte) (serverName string, n int, err error) {
	var msg []byte
	need := -1 // handshake message length, once known
	for need < 0 || len(msg) < need {
		if n+5 > MaxSize {
			return "", n, ErrTooLarge
		}
		hdr := b[n:]
		if len(hdr) > 0 && hdr[0] != 22 { // handshake
			return "", n, ErrNotTLS
		}
		if len(hdr) > 1 && hdr[1] != 3 {
			return "", n, fmt.Errorf("%w: record version %d", ErrNotTLS, hdr[1])
		}
		if len(hdr) < 5 {
			return "", n + 5, ErrIncomplete
		}
		size := int(binary.BigEndian.Uint16(hdr[3:]))
		if size == 0 {
			return "", n, fmt.Errorf("%w: empty record", ErrMalformed)
		}
		if n+5+size > MaxSize {
			return "", n, ErrTooLarge
		}
		if len(hdr) < 5+size {
			return "", n + 5 + size, ErrIncomplete
		}
		if msg == nil {
			msg = hdr[5 : 5+size : 5+size] // no copy while one record holds it
		} else {
			msg = append(msg, hdr[5:5+size]...)
		}
		n += 5 + size
		if need < 0 && len(msg) >= 4 {
			if msg[0] != 1 { // client_hello
				return "", n, fmt.Errorf("%w: handshake type %d", ErrMalformed, msg[0])
			}
			need = 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
			if need > MaxSize {
				return "", n, ErrTooLarge
			}
		}
	}
	name, err := ServerName(msg[:need])
	return name, n, err
}

func readErr(err error, n int) error {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) && n > 0 {
		return fmt.Errorf("%w: connection closed mid-hello", ErrMalformed)
	}
	return err
}

// ServerName parses a handshake message (type, length, ClientHello) and
// returns its server_name extension's host name.
func ServerName(msg []byte) (string, error) {
	p := parser{b: msg}
	if p.u8() != 1 {
		return "", fmt.Errorf("%w: not a client_hello", ErrMalformed)
	}
	body := p.sub(3)
	p = parser{b: body.b}
	p.skip(2 + 32) // legacy version, random
	p.sub(1)       // session id
	p.sub(2)       // cipher suites
	p.sub(1)       // compression methods
	if len(p.b) == 0 && !p.bad {
		return "", ErrNoSNI // no extensions at all
	}
	exts := p.sub(2)
	if p.bad || exts.bad {
		return "", fmt.Errorf("%w: truncated", ErrMalformed)
	}
	for len(exts.b) > 0 {
		typ := exts.u16()
		data := exts.sub(2)
		if exts.bad {
			return "", fmt.Errorf("%w: truncated extension", ErrMalformed)
		}
		if typ != 0 { // server_name
			continue
		}
		list := data.sub(2)
		for len(list.b) > 0 {
			kind := list.u8()
			name := list.sub(2)
			if list.bad {
				return "", fmt.Errorf("%w: truncated server_name", ErrMalformed)
			}
			if kind == 0 { // host_name
				return checkName(string(name.b))
			}
		}
		return "", ErrNoSNI
	}
	return "", ErrNoSNI
}

// checkName accepts a DNS name of letters, digits, '-' and '.'.
func checkName(s string) (string, error) {
	if s == "" || len(s) > 253 {
		return "", fmt.Errorf("%w: server name of %d bytes", ErrMalformed, len(s))
	}
	for _, c := range []byte(s) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.'
		if !ok {
			return "", fmt.Errorf("%w: server name has byte %#x", ErrMalformed, c)
		}
	}
	return strings.ToLower(s), nil
}

// parser reads big-endian fields; once a read runs past the end, bad is
// set and every later read returns zero values.
type parser struct {
	b   []byte
	bad bool
}

func (p *parser) take(n int) []byte {
	if p.bad || n > len(p.b) {
		p.bad = true
		return nil
	}
	out := p.b[:n]
	p.b = p.b[n:]
	return out
}

func (p *parser) skip(n int) { p.take(n) }

func (p *parser) u8() int {
	b := p.take(1)
	if b == nil {
		return -1
	}
	return int(b[0])
}

func (p *parser) u16() int {
	b := p.take(2)
	if b == nil {
		return -1
	}
	return int(binary.BigEndian.Uint16(b))
}

// sub reads a length-prefixed field with an lenBytes-byte length.
func (p *parser) sub(lenBytes int) parser {
	lb := p.take(lenBytes)
	if lb == nil {
		return parser{bad: true}
	}
	n := 0
	for _, c := range lb {
		n = n<<8 | int(c)
	}
	b := p.take(n)
	if b == nil {
		return parser{bad: true}
	}
	return parser{b: b}
}
