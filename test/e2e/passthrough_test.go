package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/cpuslice"
	"github.com/meshfed/meshfed/test/harness"
)

// halfCloseAfter writes parts to c one write each, then half-closes it,
// on a goroutine; the outcome comes on the channel.
func halfCloseAfter(c net.Conn, parts ...[]byte) <-chan error {
	werr := make(chan error, 1)
	go func() {
		var err error
		for _, p := range parts {
			if _, err = c.Write(p); err != nil {
				break
			}
		}
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	return werr
}

// sameBytes says how got differs from sent, if it does.
func sameBytes(got, sent []byte) error {
	if !bytes.Equal(got, sent) {
		return fmt.Errorf("got %d bytes back (sha256 %x), sent %d (sha256 %x)", len(got), sha256.Sum256(got), len(sent), sha256.Sum256(sent))
	}
	return nil
}

// TestGatewayPassesBytesUnchanged: many callers at once send a ClientHello
// and a few MiB after it through the gateway to a plain TCP echo, then
// half-close; each gets back exactly what it sent, then the end of the
// stream. Endpoints given as an IP and as a host name both work, and so
// does a ClientHello that arrives a byte at a time.
func TestGatewayPassesBytesUnchanged(t *testing.T) {
	echo := harness.TCPEcho(t)
	site := harness.StartSite(t, "east", fmt.Sprintf(`services:
- namespace: default
  name: byip
  ports: [{port: 443}]
  endpoints: [{address: 127.0.0.1, port: %[1]d}]
- namespace: default
  name: byname
  ports: [{port: 443}]
  endpoints: [{address: localhost, port: %[1]d}]
`, echo.Port))
	gw := harness.FreePort(t)
	gwProc, gwHTTP := site.DataPlane(t, harness.Binary(t), "gw", "gateway", "--site", "east", "--listen", gw)
	// By default the gateway asks for the kernel's shortest CPU slice on
	// every thread (package cpuslice), where the kernel has slices to give
	// (this process's own threads report none where it has not).
	want := cpuslice.Min
	if own, err := cpuslice.Of(os.Getpid()); err != nil || own[0] == 0 {
		want = 0
	}
	slices, err := cpuslice.Of(gwProc.Pid())
	if err != nil {
		t.Fatalf("the gateway's CPU slices: %v", err)
	}
	for i, d := range slices {
		if d != want {
			t.Errorf("the gateway's thread %d of %d has a CPU slice of %v; want %v", i+1, len(slices), d, want)
		}
	}
	hellos := map[string][]byte{}
	for _, svc := range []string{"byip", "byname"} {
		hellos[svc] = harness.ClientHello(t, "443."+svc+".default.east.bench.meshfed")
	}

	// roundTrip sends a hello for svc and size random bytes after it,
	// half-closes, and expects all of it back, then the end of the stream.
	roundTrip := func(svc string, size int, slowHello bool) error {
		c, err := net.DialTimeout("tcp", gw, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		sent := make([]byte, size)
		_, _ = rand.Read(sent)
		sent = append(bytes.Clone(hellos[svc]), sent...)
		parts := [][]byte{sent}
		if slowHello { // one byte per segment
			parts = nil
			for i := range len(sent) - size {
				parts = append(parts, sent[i:i+1])
			}
			parts = append(parts, sent[len(sent)-size:])
		}
		werr := halfCloseAfter(c, parts...)
		got, rerr := io.ReadAll(c)
		if err := <-werr; err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("read after %d of %d bytes: %w", len(got), len(sent), rerr)
		}
		return sameBytes(got, sent)
	}
	for _, svc := range []string{"byip", "byname"} {
		harness.Eventually(t, 20*time.Second, "a route for "+svc, func() error { return roundTrip(svc, 10, false) })
	}

	const callers, size = 16, 4 << 20
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			svc := []string{"byip", "byname"}[i%2]
			if err := roundTrip(svc, size, false); err != nil {
				errs <- fmt.Errorf("caller %d (%s): %w", i, svc, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := roundTrip("byip", 1000, true); err != nil {
		t.Errorf("a ClientHello sent a byte at a time: %v", err)
	}
	if v, _ := harness.Metric(gwHTTP, "meshfed_gateway_connections_total", `result="ok"`); v < callers+3 {
		t.Errorf("%v connections counted ok, want at least %d", v, callers+3)
	}

	// An idle connection: both of the gateway's sockets for it run TCP
	// keepalive, so a peer that vanishes without a word is found.
	idle, err := net.Dial("tcp", gw)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if _, err := idle.Write(hellos["byip"]); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(gw)
	gwPort, _ := strconv.Atoi(port)
	clientPort := idle.LocalAddr().(*net.TCPAddr).Port
	harness.Eventually(t, 10*time.Second, "keepalive on the gateway's sockets", func() error {
		socks, err := tcpSockets()
		if err != nil {
			return err
		}
		var down, up bool
		for _, s := range socks {
			switch {
			case s.local == gwPort && s.remote == clientPort:
				down = s.keepalive
			case s.remote == echo.Port:
				up = up || s.keepalive
			}
		}
		if !down || !up {
			return fmt.Errorf("keepalive timer on the caller's side: %v, on the endpoint's side: %v", down, up)
		}
		return nil
	})

	live := func(want float64) func() error {
		return func() error {
			if v, err := harness.Metric(gwHTTP, "meshfed_gateway_active_connections"); err != nil || v != want {
				return fmt.Errorf("meshfed_gateway_active_connections %v (%v), want %v", v, err, want)
			}
			return nil
		}
	}
	harness.Eventually(t, 5*time.Second, "the idle connection counted live", live(1))
	idle.Close()
	harness.Eventually(t, 5*time.Second, "no live connection once it closed", live(0))

	// A second gateway on the same port does not quietly take a share of
	// the callers (the listeners use SO_REUSEPORT among themselves).
	_, gw2HTTP := site.DataPlane(t, harness.Binary(t), "gw2", "gateway", "--site", "east", "--listen", gw)
	harness.Eventually(t, 10*time.Second, "the second gateway's listener refused", func() error {
		if v, _ := harness.Metric(gw2HTTP, "meshfed_proxy_listener_errors_total"); v != 1 {
			return fmt.Errorf("listener errors: %v, want 1", v)
		}
		return nil
	})
}

type tcpSocket struct {
	local, remote int
	keepalive     bool
}

// tcpSockets reads the kernel's table of IPv4 TCP sockets: ports and
// whether the keepalive timer is the one running (timer 2).
func tcpSockets() ([]tcpSocket, error) {
	raw, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	var out []tcpSocket
	for _, line := range strings.Split(string(raw), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		port := func(addr string) int {
			_, hexPort, _ := strings.Cut(addr, ":")
			n, _ := strconv.ParseInt(hexPort, 16, 32)
			return int(n)
		}
		out = append(out, tcpSocket{local: port(f[1]), remote: port(f[2]), keepalive: strings.HasPrefix(f[5], "02:")})
	}
	return out, nil
}

// TestGatewayOutOfDescriptors: a gateway out of file descriptors (run
// under `prlimit --nofile`) leaves new callers in the kernel's queue, and
// keeps a caller it accepted with its last descriptor waiting for one to
// connect upstream with; both are served once connections end, with no
// new caller to wake it. A caller that waits longer than the connect
// timeout is refused. None of it counts against the endpoints.
func TestGatewayOutOfDescriptors(t *testing.T) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Fatalf("prlimit (util-linux) is needed: %v", err)
	}
	echo := harness.TCPEcho(t)
	site := harness.StartSite(t, "east", fmt.Sprintf("services:\n- namespace: default\n  name: echo\n  ports: [{port: 443}]\n  endpoints: [{address: 127.0.0.1, port: %d}]\n", echo.Port))
	gw := harness.FreePort(t)
	const limit = 64
	proc, gwHTTP := site.DataPlane(t, prlimit, "gw", fmt.Sprintf("--nofile=%d:%d", limit, limit), harness.Binary(t), "gateway", "--site", "east", "--listen", gw, "--hello-timeout", "1m")
	hello := append(harness.ClientHello(t, "443.echo.default.east.bench.meshfed"), 'x')
	// served waits for the hello and the byte to come back: nil, a
	// timeout (the caller waits) or another error (refused).
	served := func(c net.Conn, wait time.Duration) error {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		_, err := io.ReadFull(c, make([]byte, len(hello)))
		return err
	}
	dial := func() net.Conn {
		c, err := net.DialTimeout("tcp", gw, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	open := func(wait time.Duration) (net.Conn, error) {
		c := dial()
		if _, err := c.Write(hello); err != nil {
			return c, err
		}
		return c, served(c, wait)
	}
	harness.Eventually(t, 20*time.Second, "a route for echo", func() error { _, err := open(2 * time.Second); return err })
	metrics := func() (paused, waits, refused, failures float64) {
		var errs [4]error
		paused, errs[0] = harness.Metric(gwHTTP, "meshfed_gateway_accept_paused_total")
		waits, errs[1] = harness.Metric(gwHTTP, "meshfed_proxy_upstream_descriptor_waits_total")
		refused, errs[2] = harness.Metric(gwHTTP, "meshfed_gateway_connections_total", `result="out_of_descriptors"`)
		failures, errs[3] = harness.Metric(gwHTTP, "meshfed_proxy_upstream_connections_total", `result="connect_failure"`)
		if err := errors.Join(errs[:]...); err != nil {
			t.Fatalf("gateway metrics: %v", err)
		}
		return paused, waits, refused, failures
	}
	if p, w, r, f := metrics(); p+w+r+f != 0 {
		t.Fatalf("before any shortage: paused %v, waits %v, refused %v, failures %v", p, w, r, f)
	}

	// Callers that send half a hello hold one descriptor each, until the
	// gateway has one left: it counts the numbers below the limit in
	// /proc (one it inherited may lie above).
	free := func() int {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", proc.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		n := limit
		for _, f := range fds {
			if fd, err := strconv.Atoi(f.Name()); err == nil && fd < limit {
				n--
			}
		}
		return n
	}
	var halves []net.Conn
	for have := free(); have > 1; have-- {
		half := dial()
		if _, err := half.Write(hello[:3]); err != nil {
			t.Fatal(err)
		}
		halves = append(halves, half)
		harness.Eventually(t, 5*time.Second, "the half caller accepted", func() error {
			if n := free(); n != have-1 {
				return fmt.Errorf("%d descriptors free, want %d", n, have-1)
			}
			return nil
		})
	}
	closeHalf := func() {
		halves[0].Close()
		halves = halves[1:]
	}

	// The last descriptor goes to a caller, which waits for another to
	// connect upstream with; a half caller leaving gives it one.
	waiting, err := open(time.Second)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a caller accepted with the last descriptor: %v; want it to wait", err)
	}
	closeHalf()
	if err := served(waiting, 5*time.Second); err != nil {
		t.Fatalf("the caller waiting to connect upstream is not served once a descriptor is free: %v", err)
	}
	// None left: the next caller waits in the kernel's queue, and is
	// served when a connection ends.
	queued, err := open(time.Second)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a caller with no descriptor left: %v; want it to wait", err)
	}
	waiting.Close()
	if err := served(queued, 5*time.Second); err != nil {
		t.Fatalf("the caller left in the kernel's queue is not served after a connection ended: %v", err)
	}
	// One left again, and nothing ends: the caller that takes it is
	// refused once the connect timeout (2s by default) has passed.
	closeHalf()
	start := time.Now()
	if _, err := open(10 * time.Second); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a caller that cannot connect upstream within the connect timeout: %v; want it refused", err)
	} else if waited := time.Since(start); waited < 1500*time.Millisecond {
		t.Fatalf("refused after %v; want it to wait for a descriptor up to the connect timeout", waited)
	}

	queued.Close()
	for _, c := range halves {
		c.Close()
	}
	if _, err := open(5 * time.Second); err != nil {
		t.Fatalf("a new caller after the shortage: %v", err)
	}
	paused, waits, refused, failures := metrics()
	if paused < 1 || waits < 2 || refused != 1 || failures != 0 {
		t.Errorf("accept paused %v times (want some), callers waited for a descriptor %v times (want several), refused for want of one %v (want 1), connect failures counted against the endpoint %v (want none, the shortage is the gateway's)",
			paused, waits, refused, failures)
	}
}
