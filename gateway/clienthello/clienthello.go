// Package clienthello reads the server name (SNI) from a TLS ClientHello
// without decrypting anything, so a gateway can route a connection and pass
// its bytes on unchanged.
package clienthello

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

// Read reads one ClientHello from r, across as many handshake records as it
// takes, and returns the server name and every byte read (to be replayed
// to the upstream).
func Read(r io.Reader) (serverName string, raw []byte, err error) {
	var msg []byte
	need := -1 // handshake message length, once known
	for need < 0 || len(msg) < need {
		var hdr [5]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return "", raw, readErr(err, len(raw))
		}
		raw = append(raw, hdr[:]...)
		if hdr[0] != 22 { // handshake
			return "", raw, ErrNotTLS
		}
		if hdr[1] != 3 {
			return "", raw, fmt.Errorf("%w: record version %d.%d", ErrNotTLS, hdr[1], hdr[2])
		}
		n := int(binary.BigEndian.Uint16(hdr[3:]))
		if n == 0 {
			return "", raw, fmt.Errorf("%w: empty record", ErrMalformed)
		}
		if len(raw)+n > MaxSize {
			return "", raw, ErrTooLarge
		}
		start := len(raw)
		raw = append(raw, make([]byte, n)...)
		if m, err := io.ReadFull(r, raw[start:]); err != nil {
			raw = raw[:start+m]
			return "", raw, readErr(err, len(raw))
		}
		msg = append(msg, raw[start:]...)
		if need < 0 && len(msg) >= 4 {
			if msg[0] != 1 { // client_hello
				return "", raw, fmt.Errorf("%w: handshake type %d", ErrMalformed, msg[0])
			}
			need = 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
			if need > MaxSize {
				return "", raw, ErrTooLarge
			}
		}
	}
	name, err := ServerName(msg[:need])
	return name, raw, err
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
