package e2e

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
)

const gatewayPolicy = `service: default/echo
outlierDetection: {consecutiveFailures: 5, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}
allow: [spiffe://c.test.meshfed/meshfed/node/client-host]
`

type sample struct {
	at   time.Time
	site string
	err  error
}

// load calls addr at rate per second until stop is closed, each call on
// its own connection, and returns every outcome.
func load(addr string, rate int, stop <-chan struct{}) []sample {
	var mu sync.Mutex
	var out []sample
	var wg sync.WaitGroup
	t := time.NewTicker(time.Second / time.Duration(rate))
	defer t.Stop()
	for {
		select {
		case <-stop:
			wg.Wait()
			sort.Slice(out, func(i, j int) bool { return out[i].at.Before(out[j].at) })
			return out
		case <-t.C:
		}
		wg.Add(1)
		go func(at time.Time) {
			defer wg.Done()
			site, err := call(addr)
			mu.Lock()
			out = append(out, sample{at: at, site: site, err: err})
			mu.Unlock()
		}(time.Now())
	}
}

// TestGatewayFailover: default/echo runs in east (the client's region) and
// west; a proxy in c calls it through the sites' gateways. SIGKILL east's
// gateway under 200 req/s: traffic moves to west, with the hub up and then
// with the hub down.
func TestGatewayFailover(t *testing.T) {
	f := newFederation(t, "--gossip-listen", harness.FreePort(t))
	eastIn, westIn := freeAddr(t, "127.0.0.21"), freeAddr(t, "127.0.0.22")
	eastGW := freeAddr(t, "127.0.0.1")
	_, westPort, _ := net.SplitHostPort(freeAddr(t, "127.0.0.1"))
	// West's gateway is reached by host name, as a cloud load balancer's.
	f.gateways["east"], f.gateways["west"] = eastGW, "localhost:"+westPort
	gossipFlag := func() []string { return []string{"--gossip-listen", harness.FreePort(t)} }
	c := f.addSite("c", "r1/c-1", "", gossipFlag()...)
	east := f.addSite("east", "r1/e-1", echoServices("echo", "v1", "east", eastIn), gossipFlag()...)
	west := f.addSite("west", "r2/w-1", echoServices("echo", "v2", "west", westIn), gossipFlag()...)
	for _, s := range []*spokeProc{c, east, west} {
		harness.WaitReady(t, s.http, 20*time.Second)
	}
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, gatewayPolicy)
	f.mustCLI("policy", "apply", "-f", policy)

	eastApp, westApp := startEcho(t, "east"), startEcho(t, "west")
	for _, x := range []struct {
		s   *spokeProc
		in  string
		app *echoApp
	}{{east, eastIn, eastApp}, {west, westIn, westApp}} {
		host, port, _ := net.SplitHostPort(x.in)
		f.startProxy(t, x.s, x.s.site+"-host", "--workload", "spiffe://"+x.s.site+".test.meshfed/ns/default/sa/echo",
			"--address", host, "--inbound", port+"="+x.app.addr, "--outbound-prefix", "-")
	}
	gateway := func(s *spokeProc, listen string) *proxyProc {
		return f.startDataPlane(t, s, "gateway", s.site+"-gw", append([]string{"--site", s.site, "--listen", listen, "--hello-timeout", "1s", "--drain-timeout", "10s"}, gossipFlag()...)...)
	}
	eastGateway := gateway(east, eastGW)
	gateway(west, "127.0.0.1:"+westPort)
	client := f.startProxy(t, c, "client-host", "--outbound-prefix", "127.102.0.0/16")
	echo := client.listener(t, "echo.default:9080")

	gossipAlive := func(site string, want float64) func() error {
		return func() error {
			v, err := harness.Metric(c.http, "meshfed_spoke_gossip_site_alive", `site="`+site+`"`)
			if err != nil || v != want {
				return fmt.Errorf("c's spoke: %s alive=%v, want %v (%v)", site, v, want, err)
			}
			return nil
		}
	}
	harness.Eventually(t, 30*time.Second, "east and west gateways alive in c's gossip view", func() error {
		if err := gossipAlive("east", 1)(); err != nil {
			return err
		}
		return gossipAlive("west", 1)()
	})
	harness.Eventually(t, 20*time.Second, "the hub's gossip view in site list", func() error {
		var sites []catalog.Site
		if err := json.Unmarshal([]byte(f.mustCLI("site", "list", "-o", "json")), &sites); err != nil {
			return err
		}
		for _, s := range sites {
			if s.Name != "c" && s.Gossip != "alive" {
				return fmt.Errorf("site %s: gossip %q", s.Name, s.Gossip)
			}
		}
		return nil
	})
	eastBack := func() error {
		if site, err := call(echo); err != nil || site != "east" {
			return fmt.Errorf("call answered by %q: %v", site, err)
		}
		return nil
	}
	harness.Eventually(t, 20*time.Second, "calls reach east through its gateway", eastBack)

	failover := func(name string) {
		viaEastSoFar := func() float64 {
			v, _ := harness.Metric(client.http, "meshfed_proxy_upstream_connections_total", `site="east"`, `result="success"`)
			return v
		}
		base := viaEastSoFar()
		stop := make(chan struct{})
		results := make(chan []sample, 1)
		go func() { results <- load(echo, 200, stop) }()
		// Let 100 calls go to east before the kill.
		harness.Eventually(t, 5*time.Second, "traffic to east", func() error {
			if v := viaEastSoFar() - base; v < 100 {
				return fmt.Errorf("%v calls via east so far", v)
			}
			return nil
		})
		attempts := func() float64 {
			v, _ := harness.Metric(client.http, "meshfed_proxy_upstream_connections_total", `site="east"`)
			return v
		}
		last := attempts()
		killed := time.Now()
		eastGateway.p.Kill()
		lastAttempt, markedDown := killed, time.Duration(0)
		// Five seconds of traffic after the kill: about 1,000 calls.
		for time.Since(killed) < 5*time.Second {
			if v := attempts(); v != last {
				last, lastAttempt = v, time.Now()
			}
			if markedDown == 0 && gossipAlive("east", 0)() == nil {
				markedDown = time.Since(killed)
			}
			time.Sleep(10 * time.Millisecond)
		}
		close(stop)
		samples := <-results
		// A call in flight through east's gateway when it is killed is cut
		// (no L4 proxy can save it); those are counted apart from the calls
		// made after the kill, which failover must carry.
		cut, failed, after, viaEast := 0, 0, 0, 0
		for _, s := range samples {
			if s.at.Before(killed) {
				if s.err != nil {
					cut++
				}
				continue
			}
			after++
			if s.err != nil {
				failed++
				t.Logf("%s: call at kill+%s failed: %v", name, s.at.Sub(killed).Round(time.Millisecond), s.err)
			}
			if s.site == "east" && s.at.After(killed.Add(100*time.Millisecond)) {
				viaEast++
			}
		}
		stopped := lastAttempt.Sub(killed)
		t.Logf("%s: %d calls at 200/s; %d in flight at the kill were cut; of the %d made after the kill %d failed (%.2f%%); last connection attempt to east %s after the kill; c's spoke marked east down (gossip) after %s",
			name, len(samples), cut, after, failed, 100*float64(failed)/float64(after), stopped.Round(time.Millisecond), markedDown.Round(time.Millisecond))
		// Traffic must leave east within 1s; gossip, which also tells
		// proxies that never called east, "within about a second".
		if stopped > time.Second || markedDown == 0 || markedDown > 1500*time.Millisecond {
			t.Errorf("%s: traffic to east stopped after %s (want within 1s), gossip marked it down after %s (want about a second)", name, stopped, markedDown)
		}
		if float64(failed) > 0.001*float64(after) || viaEast > 0 {
			t.Errorf("%s: %d of %d calls after the kill failed (want at most 0.1%%), %d answered by east after its gateway died", name, failed, after, viaEast)
		}
	}
	failover("hub up")

	// East's gateway comes back: gossip marks east alive, traffic returns.
	restart := func() {
		eastGateway = gateway(east, eastGW)
		harness.Eventually(t, 20*time.Second, "east alive again", gossipAlive("east", 1))
		harness.Eventually(t, 20*time.Second, "calls reach east again", eastBack)
	}
	restart()

	t.Run("SIGTERM drains: live connections finish, new ones go to west", func(t *testing.T) {
		live, site := greeted(t, echo)
		if site != "east\n" {
			t.Fatalf("the live connection reached %q", site)
		}
		eastGateway.p.Signal(syscall.SIGTERM)
		// It leaves the pool at once: c's spoke marks east down.
		harness.Eventually(t, 5*time.Second, "east left the pool", gossipAlive("east", 0))
		// c's spoke knows; its push to the client proxy follows within
		// moments (CI once saw one call reach east between the two).
		harness.Eventually(t, 2*time.Second, "new calls during the drain go to west", func() error {
			if site, err := call(echo); err != nil || site != "west" {
				return fmt.Errorf("a new call during the drain: %q, %v", site, err)
			}
			return nil
		})
		stillEchoes(t, live)
	})
	restart()

	t.Run("gossip key rotation keeps the pool together", func(t *testing.T) {
		f.mustCLI("gossip", "rotate-key", "--delay", "2s")
		// Every member installs the key, then encrypts with it.
		harness.Eventually(t, 20*time.Second, "members switched keys", func() error {
			for _, p := range []*harness.Process{c.p, east.p, west.p, eastGateway.p} {
				if !strings.Contains(p.Log(), "gossip encrypts with a new key") {
					return fmt.Errorf("%s has not switched", p.Name)
				}
			}
			return nil
		})
		// Probes now run on the new key: a second later, still alive.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) {
			if err := gossipAlive("east", 1)(); err != nil {
				t.Fatal(err)
			}
			if err := gossipAlive("west", 1)(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})

	f.hub.Kill()
	failover("hub down")
}

// TestGatewayIsNoOpenRelay: only SNIs of this site's exported services
// pass east's gateway; everything else is refused and counted.
func TestGatewayIsNoOpenRelay(t *testing.T) {
	f := newFederation(t)
	eastIn := freeAddr(t, "127.0.0.21")
	eastGW := freeAddr(t, "127.0.0.1")
	f.gateways["east"] = eastGW
	east := f.addSite("east", "r1/e-1", echoServices("echo", "v1", "east", eastIn))
	west := f.addSite("west", "r2/w-1", echoServices("other", "v1", "west", freeAddr(t, "127.0.0.22")))
	harness.WaitReady(t, east.http, 20*time.Second)
	harness.WaitReady(t, west.http, 20*time.Second)
	app := startEcho(t, "east")
	host, port, _ := net.SplitHostPort(eastIn)
	f.startProxy(t, east, "east-host", "--workload", "spiffe://east.test.meshfed/ns/default/sa/echo",
		"--address", host, "--inbound", port+"="+app.addr, "--outbound-prefix", "-")
	gw := f.startDataPlane(t, east, "gateway", "east-gw", "--site", "east", "--listen", eastGW, "--hello-timeout", "1s", "--concurrency", "1")
	exported := "9080.echo.default.east.test.meshfed"
	// The route exists once the gateway has its configuration.
	harness.Eventually(t, 20*time.Second, "a route for "+exported, func() error {
		return hello(eastGW, exported)
	})
	// One loop, and two Ps: with one, each wait of the loop would hand it
	// to another thread and back.
	if n, err := harness.Metric(gw.http, "meshfed_proxy_event_loops"); n != 1 {
		t.Errorf("a gateway with --concurrency 1 runs %v event loops (%v); want 1, its listener's", n, err)
	}
	if n, err := harness.Metric(gw.http, "go_sched_gomaxprocs_threads"); n != 2 {
		t.Errorf("a gateway with --concurrency 1 has GOMAXPROCS %v (%v); want 2", n, err)
	}
	before := app.conns.Load()
	refused := map[string]string{
		"unknown":                  "example.com",
		"a service east lacks":     "9080.nothere.default.east.test.meshfed",
		"west's service, via east": "9080.other.default.west.test.meshfed",
		"another federation":       "9080.echo.default.east.other.meshfed",
	}
	for what, sni := range refused {
		if err := hello(eastGW, sni); err == nil {
			t.Errorf("%s (%s): the gateway passed it on", what, sni)
		}
	}
	// Not TLS, and a client that never finishes its hello.
	conn, err := net.Dial("tcp", eastGW)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(conn, "CONNECT 127.0.0.22:80 HTTP/1.1\r\n\r\n")
	if n, _ := conn.Read(make([]byte, 1)); n != 0 {
		t.Error("a plain-text CONNECT got an answer")
	}
	conn.Close()
	slow, err := net.Dial("tcp", eastGW)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	_, _ = slow.Write([]byte{22, 3, 1, 0, 200})
	_ = slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := slow.Read(make([]byte, 1)); n != 0 {
		t.Error("a slow hello got an answer")
	}
	if got := app.conns.Load() - before; got != 0 {
		t.Errorf("the app got %d connections from refused callers", got)
	}
	for result, want := range map[string]float64{"unknown_sni": 4, "not_tls": 1, "hello_timeout": 1} {
		harness.Eventually(t, 5*time.Second, result+" counted", func() error {
			if v, _ := harness.Metric(gw.http, "meshfed_gateway_connections_total", `result="`+result+`"`); v < want {
				return fmt.Errorf("%s: %v, want %v", result, v, want)
			}
			return nil
		})
	}
}

// hello sends a ClientHello with sni to addr and reports whether a TLS
// server answered (the gateway passed the connection on).
func hello(addr, sni string) error {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	c := tls.Client(conn, &tls.Config{ServerName: sni, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	err = c.Handshake()
	if err == nil {
		return nil
	}
	// A server that wants a client certificate still answered with its
	// ServerHello: the connection reached a proxy.
	if c.ConnectionState().HandshakeComplete || len(c.ConnectionState().PeerCertificates) > 0 {
		return nil
	}
	return err
}
