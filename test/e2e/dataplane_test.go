package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
)

// echoApp is a workload: it greets each connection with its name, then
// echoes.
type echoApp struct {
	name  string
	addr  string
	conns atomic.Int64
}

func startEcho(t *testing.T, name string) *echoApp {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	a := &echoApp{name: name, addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.conns.Add(1)
			go func() {
				defer c.Close()
				fmt.Fprintln(c, a.name)
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return a
}

// freeAddr is a free port on ip, a loopback address of its own.
func freeAddr(t *testing.T, ip string) string {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type proxyProc struct {
	p    *harness.Process
	http string
	args []string
}

// startProxy runs a proxy for node at s's site, attested with a fresh
// node token.
func (f *federation) startProxy(t *testing.T, s *spokeProc, node string, extra ...string) *proxyProc {
	t.Helper()
	return f.startDataPlane(t, s, "proxy", node, extra...)
}

// startDataPlane runs `meshfed <command>` (proxy or gateway) for node at
// s's site, attested with a fresh node token, and waits until it has its
// configuration.
func (f *federation) startDataPlane(t *testing.T, s *spokeProc, command, node string, extra ...string) *proxyProc {
	t.Helper()
	token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", s.site, "--node", node))
	pp := &proxyProc{http: harness.FreePort(t)}
	pp.args = append([]string{command, "--identity", s.identity, "--xds", s.xds, "--token", token, "--http-listen", pp.http, "--drain-timeout", "1s"}, extra...)
	pp.p = harness.Start(t, command+"-"+node, f.bin, pp.args...)
	harness.WaitReady(t, pp.http, 20*time.Second)
	return pp
}

// listener waits until the proxy runs the named listener and returns its
// address.
func (pp *proxyProc) listener(t *testing.T, name string) string {
	t.Helper()
	var addr string
	harness.Eventually(t, 20*time.Second, "listener "+name, func() error {
		body, err := harness.GetText("http://" + pp.http + "/v1/listeners")
		if err != nil {
			return err
		}
		var ls map[string]string
		if err := json.Unmarshal([]byte(body), &ls); err != nil {
			return err
		}
		if addr = ls[name]; addr == "" {
			return fmt.Errorf("listeners: %v", ls)
		}
		return nil
	})
	return addr
}

// call connects to addr and returns the greeting of the app it reached.
func call(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no greeting: %w", err)
	}
	return strings.TrimSpace(line), nil
}

// calls makes n calls over workers connections at a time and counts the
// greetings; failures are counted under "".
func calls(addr string, n, workers int) map[string]int {
	var mu sync.Mutex
	out := map[string]int{}
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				site, err := call(addr)
				if err != nil {
					site = ""
				}
				mu.Lock()
				out[site]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

const echoPolicy = `service: default/echo
retries: 2
outlierDetection: {consecutiveFailures: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100}
allow: [spiffe://c.test.meshfed/meshfed/node/client-host]
`

func echoServices(name, version, node, addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	return fmt.Sprintf(`services:
- namespace: default
  name: %s
  ports: [{name: tcp, port: 9080}]
  endpoints:
  - {address: %s, port: %s, identity: "spiffe://%s.test.meshfed/ns/default/sa/echo", labels: {version: %s, meshfed.io/node: %s}}
`, name, host, port, node, version, node+"-host")
}

// TestDataPlane: a proxy in site c calls default/echo, which runs in east
// (same region, the closer priority) and west (another region), each
// behind its own proxy; the site's gateway address is that proxy here, so
// the cross-site path is real mTLS end to end.
func TestDataPlane(t *testing.T) {
	f := newFederation(t)
	eastIn, westIn := freeAddr(t, "127.0.0.21"), freeAddr(t, "127.0.0.22")
	f.gateways["east"], f.gateways["west"] = eastIn, westIn
	c := f.addSite("c", "r1/c-1", "")
	east := f.addSite("east", "r1/e-1", echoServices("echo", "v1", "east", eastIn))
	west := f.addSite("west", "r2/w-1", echoServices("echo", "v2", "west", westIn))
	for _, s := range []*spokeProc{c, east, west} {
		harness.WaitReady(t, s.http, 20*time.Second)
	}
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, echoPolicy)
	f.mustCLI("policy", "apply", "-f", policy)

	eastApp, westApp := startEcho(t, "east"), startEcho(t, "west")
	serverProxy := func(s *spokeProc, in string, app *echoApp) *proxyProc {
		host, port, _ := net.SplitHostPort(in)
		return f.startProxy(t, s, s.site+"-host", "--workload", "spiffe://"+s.site+".test.meshfed/ns/default/sa/echo",
			"--address", host, "--inbound", port+"="+app.addr, "--outbound-prefix", "-")
	}
	eastProxy := serverProxy(east, eastIn, eastApp)
	westProxy := serverProxy(west, westIn, westApp)
	// More CPUs than the machine's two: the flag, not the default, sets
	// how many event loops the client relays on.
	client := f.startProxy(t, c, "client-host", "--outbound-prefix", "127.100.0.0/16", "--concurrency", "3")
	echo := client.listener(t, "echo.default:9080")

	t.Run("closer priority first", func(t *testing.T) {
		harness.Eventually(t, 20*time.Second, "east answers", func() error {
			_, err := call(echo)
			return err
		})
		got := calls(echo, 100, 4)
		if got["east"] != 100 {
			t.Fatalf("100 calls from c: %v; want all to east, c's region", got)
		}
	})

	t.Run("unauthorised caller refused", func(t *testing.T) {
		intruder := f.startProxy(t, c, "intruder-host", "--outbound-prefix", "127.101.0.0/16")
		addr := intruder.listener(t, "echo.default:9080")
		before := eastApp.conns.Load()
		if site, err := call(addr); err == nil {
			t.Fatalf("a caller outside the allow list reached %s", site)
		}
		denied, _ := harness.Metric(eastProxy.http, "meshfed_proxy_inbound_connections_total", `result="denied"`)
		if denied < 1 || eastApp.conns.Load() != before {
			t.Fatalf("denied=%v, app connections %d→%d: want a denial and no connection to the app", denied, before, eastApp.conns.Load())
		}
		intruder.p.Kill()
	})

	t.Run("config push keeps live connections", func(t *testing.T) {
		var live []*bufConn
		for i := 0; i < 10; i++ {
			conn, _ := greeted(t, echo)
			live = append(live, conn)
		}
		// A changed policy (a changed listener), then a new service (a new
		// listener), while the connections are open.
		applied, _ := harness.Metric(client.http, "meshfed_proxy_configs_applied_total")
		writeFile(t, policy, strings.Replace(echoPolicy, "retries: 2", "retries: 3", 1))
		f.mustCLI("policy", "apply", "-f", policy)
		harness.Eventually(t, 10*time.Second, "policy push applied", func() error {
			if n, _ := harness.Metric(client.http, "meshfed_proxy_configs_applied_total"); n <= applied {
				return fmt.Errorf("configs applied: still %v", n)
			}
			return nil
		})
		writeFile(t, west.file, echoServices("echo", "v2", "west", westIn)+strings.TrimPrefix(echoServices("other", "v1", "west", westIn), "services:\n"))
		client.listener(t, "other.default:9080")
		for i, conn := range live {
			msg := fmt.Sprintf("ping %d\n", i)
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(conn, msg); err != nil {
				t.Fatalf("connection %d cut by the push: %v", i, err)
			}
			got, err := conn.r.ReadString('\n')
			if err != nil || got != msg {
				t.Fatalf("connection %d after the push: %q, %v", i, got, err)
			}
		}
	})

	t.Run("bulk data and half-closes pass unchanged", func(t *testing.T) {
		// Callers at once, each sending 4 MiB and half-closing; half of
		// them read slowly, so the proxies' writes meet full sockets.
		const callers, size = 8, 4 << 20
		errs := make(chan error, callers)
		for i := range callers {
			go func() { errs <- bulkEcho(echo, "east", size, i%2 == 1) }()
		}
		for range callers {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
		// The callers took turns over the loops: every one is running.
		for _, pp := range []struct {
			name string
			p    *proxyProc
			want float64
		}{{"client (--concurrency 3)", client, 3}, {"east's (default: 2 at most)", eastProxy, float64(min(2, runtime.GOMAXPROCS(0)))}} {
			if n, err := harness.Metric(pp.p.http, "meshfed_proxy_event_loops"); n != pp.want {
				t.Errorf("%s proxy runs %v event loops (%v); want %v", pp.name, n, err, pp.want)
			}
		}
	})

	t.Run("failover to the next priority", func(t *testing.T) {
		eastProxy.p.Kill()
		got := calls(echo, 200, 1)
		failures, _ := harness.Metric(client.http, "meshfed_proxy_upstream_connections_total", `result="connect_failure"`, `site="east"`)
		t.Logf("after killing east's endpoint: %v; connect failures to east: %v (retried on west)", got, failures)
		if got[""] != 0 || got["west"] != 200 {
			t.Fatalf("200 calls after east died: %v; want all 200 answered by west", got)
		}
		ejections, _ := harness.Metric(client.http, "meshfed_proxy_outlier_ejections_total", `site="east"`)
		if ejections < 1 {
			t.Fatalf("east was never ejected after %v connect failures", failures)
		}
	})

	t.Run("weighted split", func(t *testing.T) {
		eastProxy = serverProxy(east, eastIn, eastApp)
		writeFile(t, policy, echoPolicy+`split:
- {name: stable, weight: 90, labels: {version: v1}}
- {name: canary, weight: 10, labels: {version: v2}}
`)
		f.mustCLI("policy", "apply", "-f", policy)
		harness.Eventually(t, 20*time.Second, "east back", func() error {
			if site, err := call(echo); err != nil || site != "east" {
				return fmt.Errorf("%s %v", site, err)
			}
			return nil
		})
		got := calls(echo, 2000, 8)
		share := float64(got["east"]) / 20
		t.Logf("2000 calls with a 90/10 split: %v (east %.1f%%)", got, share)
		if got[""] != 0 || share < 87 || share > 93 {
			t.Fatalf("2000 calls: %v; want 90%% ±3 to east (v1) and none failed", got)
		}
	})

	t.Run("SIGTERM: live connections go on until the drain timeout", func(t *testing.T) {
		live, _ := greeted(t, echo)
		client.p.Signal(syscall.SIGTERM)
		harness.Eventually(t, 5*time.Second, "the listener closed", func() error {
			c, err := net.Dial("tcp", echo)
			if err == nil {
				c.Close()
				return errors.New("still accepting")
			}
			return nil
		})
		stillEchoes(t, live)
		// The drain timeout (1s) closes it, and the proxy exits.
		if b, err := live.r.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the live connection after the drain timeout: %q, %v; want it closed", b, err)
		}
		select {
		case <-client.p.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("the proxy has not exited 5s after its drain timeout")
		}
	})
	_ = westProxy
}

// bulkEcho sends size random bytes through addr to the echoApp named
// want and half-closes; it expects the greeting, the same bytes back and
// the end of the stream. A slow reader pauses 2ms every 32 KiB.
func bulkEcho(addr, want string, size int, slow bool) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	sent := make([]byte, size)
	_, _ = rand.Read(sent)
	werr := halfCloseAfter(c, sent)
	r := bufio.NewReader(c)
	if greeting, err := r.ReadString('\n'); greeting != want+"\n" {
		return fmt.Errorf("greeting %q, %v; want %s", greeting, err, want)
	}
	var got bytes.Buffer
	for {
		n, err := got.ReadFrom(io.LimitReader(r, 32<<10))
		if err != nil {
			return fmt.Errorf("read after %d of %d bytes: %w", got.Len(), size, err)
		}
		if n == 0 {
			break
		}
		if slow {
			time.Sleep(2 * time.Millisecond)
		}
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return sameBytes(got.Bytes(), sent)
}

// bufConn is a connection to an echoApp with the reader that read its
// greeting.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

// greeted connects to an echoApp through addr and reads its greeting; it
// returns the connection, closed when the test ends, and the greeting
// (the app's site and a newline).
func greeted(t *testing.T, addr string) (*bufConn, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	bc := &bufConn{Conn: c, r: bufio.NewReader(c)}
	greeting, err := bc.r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return bc, greeting
}

// stillEchoes checks that a live connection still carries a line both
// ways while its proxy or gateway drains.
func stillEchoes(t *testing.T, c *bufConn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, "still here"); err != nil {
		t.Fatal(err)
	}
	if got, err := c.r.ReadString('\n'); err != nil || got != "still here\n" {
		t.Fatalf("the live connection during the drain: %q, %v", got, err)
	}
}
