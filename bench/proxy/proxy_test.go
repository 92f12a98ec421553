// Package proxy benchmarks the data plane: a client proxy and a server
// proxy (the built binary, mTLS between them, configured by a real spoke)
// against a direct connection to the same app and against a pair of
// HAProxy 2.6 doing the same mTLS, in the same run. `make bench` runs it
// once; `go test` alone runs no benchmark.
package proxy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshfed/meshfed/bench/load"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestMain removes the binaries the benchmark built.
func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

const (
	rate     = 1000 // requests per second, over conns connections
	conns    = 10
	duration = 5 * time.Second
	// latencyRounds splits each target's duration into rounds.
	latencyRounds = 5
	// newConns is how many new connections each target gets, one
	// request/response on each.
	newConns  = 200
	reqSize   = 128
	bulkBytes = 256 << 20
	// cpuDuration is how long each pair's CPU per request is measured.
	cpuDuration = 3 * time.Second
)

// apps: an echo server (latency) and a sink that counts what it got
// (throughput).
func apps(b *testing.B) (echo, sink string) {
	listen := func(handle func(net.Conn)) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		go load.Serve(ln, handle)
		return ln.Addr().String()
	}
	return listen(load.Echo), listen(load.Sink)
}

func BenchmarkProxyPair(b *testing.B) {
	echo, sink := apps(b)
	in := func() string {
		l, err := net.Listen("tcp", "127.0.0.31:0")
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		_, port, _ := net.SplitHostPort(l.Addr().String())
		return port
	}
	echoPort, sinkPort := in(), in()
	ep := func(port string) string {
		return fmt.Sprintf("  endpoints: [{address: 127.0.0.31, port: %s, identity: spiffe://east.bench.meshfed/ns/default/sa/app, labels: {meshfed.io/node: server}}]\n", port)
	}
	site := harness.StartSite(b, "east", "services:\n- namespace: default\n  name: echo\n  ports: [{port: 9080}]\n"+ep(echoPort)+
		"- namespace: default\n  name: sink\n  ports: [{port: 9081}]\n"+ep(sinkPort))
	bin := harness.Command(b, "meshfed-proxy")
	server, serverHTTP := site.DataPlane(b, bin, "server", "--workload", "spiffe://east.bench.meshfed/ns/default/sa/app", "--address", "127.0.0.31",
		"--inbound", echoPort+"="+echo, "--inbound", sinkPort+"="+sink, "--outbound-prefix", "-")
	client, clientHTTP := site.DataPlane(b, bin, "client", "--outbound-prefix", "127.110.0.0/16")
	ls := listeners(b, clientHTTP)
	pEcho, pSink := ls["echo.default:9080"], ls["sink.default:9081"]
	// A second client proxy that offers only X25519 for the key exchange,
	// as HAProxy's OpenSSL 3.0 does; Go offers X25519MLKEM768
	// (post-quantum) first. It shows what that costs a new connection.
	envBin, err := exec.LookPath("env")
	if err != nil {
		b.Fatal(err)
	}
	_, classicHTTP := site.DataPlane(b, envBin, "client-x25519", "GODEBUG=tlsmlkem=0", bin, "--outbound-prefix", "127.111.0.0/16")
	cEcho := listeners(b, classicHTTP)["echo.default:9080"]
	// The first connections through the pair make its handshakes.
	if _, err := load.Latency(tcp(pEcho), rate, conns, reqSize, 200*time.Millisecond); err != nil {
		b.Fatalf("through the proxies: %v", err)
	}

	hEcho, hSink, haproxies := haproxyPair(b, echo, sink)

	fmt.Printf("proxy benchmark: client proxy -> mTLS -> server proxy -> app, vs app directly and vs an HAProxy 2.6 pair doing the same; loopback, 2 cores\n")
	idle, _ := harness.Memory(client.Pid(), "VmRSS")
	fmt.Printf("client proxy RSS with its configuration, before traffic: %.1f MB\n", float64(idle)/1e6)
	steal := load.Steal()
	lat, err := load.LatencyRounds([]load.Dial{tcp(echo), tcp(pEcho), tcp(hEcho)}, rate, conns, reqSize, duration/latencyRounds, latencyRounds)
	if err != nil {
		b.Fatal(err)
	}
	direct, proxied, peer := lat[0], lat[1], lat[2]
	fmt.Printf("latency on open connections (each made one exchange first, not counted): %d rounds of %v per target, in rotating order; CPU steal by the host meanwhile %.1f%% (shared hosts: spikes of it show in p99)\n",
		latencyRounds, duration/latencyRounds, 100*steal())
	pct, ms, verdict := load.Percentile, load.Ms, load.Verdict
	added50, added99 := pct(proxied, 50)-pct(direct, 50), pct(proxied, 99)-pct(direct, 99)
	fmt.Printf("latency at %d req/s over %d connections (%d B echo): direct p50 %.3f ms p99 %.3f ms; meshfed pair p50 %.3f ms p99 %.3f ms; haproxy pair p50 %.3f ms p99 %.3f ms\n",
		rate, conns, reqSize, ms(pct(direct, 50)), ms(pct(direct, 99)), ms(pct(proxied, 50)), ms(pct(proxied, 99)), ms(pct(peer, 50)), ms(pct(peer, 99)))
	fmt.Printf("added latency: meshfed p50 %.3f ms, p99 %.3f ms (target p99 <= 1 ms: %s); haproxy p50 %.3f ms, p99 %.3f ms\n", ms(added50), ms(added99),
		verdict(added99 <= time.Millisecond), ms(pct(peer, 50)-pct(direct, 50)), ms(pct(peer, 99)-pct(direct, 99)))
	// A new connection's first exchange also pays for the pair's upstream
	// connection and mTLS handshake (the HAProxy pair's too).
	first, err := load.ConnectEach([]load.Dial{tcp(echo), tcp(pEcho), tcp(hEcho), tcp(cEcho)}, newConns, reqSize)
	if err != nil {
		b.Fatal(err)
	}
	fmt.Printf("new connection + first %d B request/response, %d each, interleaved: direct p50 %.3f ms p99 %.3f ms; meshfed pair p50 %.3f ms p99 %.3f ms; haproxy pair p50 %.3f ms p99 %.3f ms\n",
		reqSize, newConns, ms(pct(first[0], 50)), ms(pct(first[0], 99)), ms(pct(first[1], 50)), ms(pct(first[1], 99)), ms(pct(first[2], 50)), ms(pct(first[2], 99)))
	fmt.Printf("  meshfed pair with X25519 alone (GODEBUG=tlsmlkem=0, as the HAProxy pair negotiates): p50 %.3f ms p99 %.3f ms\n", ms(pct(first[3], 50)), ms(pct(first[3], 99)))
	// CPU per request/response of the two proxies (and of the two
	// HAProxies), at the same rate on open connections, one pair after the
	// other: what a wakeup costs, which is most of a small request's cost.
	cpu := func(pids ...int) time.Duration { return harness.CPUTime(b, pids...) }
	perRequest := func(dial load.Dial, pids ...int) float64 {
		before := cpu(pids...)
		trips, err := load.Latency(dial, rate, conns, reqSize, cpuDuration)
		if err != nil {
			b.Fatal(err)
		}
		return float64((cpu(pids...) - before).Microseconds()) / float64(len(trips))
	}
	pxReq, hpReq := perRequest(tcp(pEcho), client.Pid(), server.Pid()), perRequest(tcp(hEcho), haproxies...)
	fmt.Printf("CPU per %d B request/response at %d req/s, %v each (not a target): the two proxies %.0f µs, the two HAProxies %.0f µs (%.2fx)\n",
		reqSize, rate, cpuDuration, pxReq, hpReq, pxReq/hpReq)
	// CPU seconds per GB: of this process (the app's two ends) and of the
	// two proxies, to show where a proxied byte's cost goes.
	perGB := func(d time.Duration) float64 { return d.Seconds() / (float64(bulkBytes) / 1e9) }
	for _, n := range []int{1, 4} {
		app0 := cpu(os.Getpid())
		d, err := load.Throughput(tcp(sink), bulkBytes, n)
		if err != nil {
			b.Fatal(err)
		}
		app1, px1 := cpu(os.Getpid()), cpu(client.Pid(), server.Pid())
		p, err := load.Throughput(tcp(pSink), bulkBytes, n)
		if err != nil {
			b.Fatal(err)
		}
		app2, px2, hp2 := cpu(os.Getpid()), cpu(client.Pid(), server.Pid()), cpu(haproxies...)
		h, err := load.Throughput(tcp(hSink), bulkBytes, n)
		if err != nil {
			b.Fatal(err)
		}
		app3, hp3 := cpu(os.Getpid()), cpu(haproxies...)
		fmt.Printf("throughput over %d connection(s): direct %.0f MB/s, meshfed pair %.0f MB/s, haproxy pair %.0f MB/s; meshfed/direct %.2fx (target >= 0.8x: %s), haproxy/direct %.2fx, meshfed/haproxy %.2fx\n",
			n, d/1e6, p/1e6, h/1e6, p/d, verdict(p/d >= 0.8), h/d, p/h)
		fmt.Printf("  CPU per GB: direct %.2f s (the app's ends); meshfed pair %.2f s (the app's ends %.2f s, the two proxies %.2f s); haproxy pair %.2f s (the app's ends %.2f s, the two proxies %.2f s)\n",
			perGB(app1-app0), perGB(app2-app1+px2-px1), perGB(app2-app1), perGB(px2-px1), perGB(app3-app2+hp3-hp2), perGB(app3-app2), perGB(hp3-hp2))
		b.ReportMetric(p/d, fmt.Sprintf("throughput-ratio-%dconn", n))
		b.ReportMetric(p/h, fmt.Sprintf("throughput-vs-haproxy-%dconn", n))
	}
	for _, pr := range []struct {
		name, http string
		p          *harness.Process
	}{{"client", clientHTTP, client}, {"server", serverHTTP, server}} {
		rss, err := harness.Memory(pr.p.Pid(), "VmRSS")
		if err != nil {
			b.Fatal(err)
		}
		peak, _ := harness.Memory(pr.p.Pid(), "VmHWM")
		file, _ := harness.Memory(pr.p.Pid(), "RssFile")
		heap, _ := harness.Metric(pr.http, "go_memstats_heap_inuse_bytes")
		sys, _ := harness.Metric(pr.http, "go_memstats_sys_bytes")
		fmt.Printf("%s proxy RSS %.1f MB, peak %.1f MB (target <= 20 MB: %s); of it the binary's pages %.1f MB; Go heap in use %.1f MB, Go runtime total %.1f MB\n",
			pr.name, float64(rss)/1e6, float64(peak)/1e6, verdict(peak <= 20e6), float64(file)/1e6, heap/1e6, sys/1e6)
	}
	b.ReportMetric(ms(added99), "added-p99-ms")
}

// listeners waits until the proxy serving /v1/listeners at http has the
// echo and sink listeners, and returns its listeners' addresses by name.
func listeners(b *testing.B, http string) map[string]string {
	var ls map[string]string
	deadline := time.Now().Add(30 * time.Second)
	for ls["echo.default:9080"] == "" || ls["sink.default:9081"] == "" {
		if time.Now().After(deadline) {
			b.Fatalf("the client proxy has no listeners for echo and sink: %v", ls)
		}
		time.Sleep(50 * time.Millisecond)
		body, _ := harness.GetText("http://" + http + "/v1/listeners")
		_ = json.Unmarshal([]byte(body), &ls)
	}
	return ls
}

// haproxyPair starts two HAProxy processes that do what the proxy pair
// does: the client side takes plain TCP and originates mTLS (TLS 1.3,
// peer verified against the CA), the server side terminates it, requires
// a client certificate from the CA and passes the bytes to the app. It
// returns the client side's addresses for echo and sink, and both pids.
func haproxyPair(b *testing.B, echo, sink string) (string, string, []int) {
	dir := b.TempDir()
	writePKI(b, dir)
	cEcho, cSink, sEcho, sSink := harness.FreePort(b), harness.FreePort(b), harness.FreePort(b), harness.FreePort(b)
	server := harness.HAProxy(b, "haproxy-server", fmt.Sprintf(`frontend echo
  bind %[1]s ssl crt %[5]s/server.pem ca-file %[5]s/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend echo
frontend sink
  bind %[2]s ssl crt %[5]s/server.pem ca-file %[5]s/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend sink
backend echo
  server app %[3]s
backend sink
  server app %[4]s
`, sEcho, sSink, echo, sink, dir))
	client := harness.HAProxy(b, "haproxy-client", fmt.Sprintf(`frontend echo
  bind %[1]s
  default_backend echo
frontend sink
  bind %[2]s
  default_backend sink
backend echo
  server s %[3]s ssl crt %[5]s/client.pem ca-file %[5]s/ca.pem verify required verifyhost app sni str(app) ssl-min-ver TLSv1.3
backend sink
  server s %[4]s ssl crt %[5]s/client.pem ca-file %[5]s/ca.pem verify required verifyhost app sni str(app) ssl-min-ver TLSv1.3
`, cEcho, cSink, sEcho, sSink, dir))
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := load.Latency(tcp(cEcho), rate, 1, reqSize, 50*time.Millisecond)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the HAProxy pair does not pass traffic: %v\n%s\n%s", err, client.Log(), server.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return cEcho, cSink, []int{client.Pid(), server.Pid()}
}

// writePKI writes a CA and, signed by it, a server and a client
// certificate (both for the name "app"), each with its key, as HAProxy
// reads them.
func writePKI(b *testing.B, dir string) {
	td := spiffeid.RequireTrustDomainFromString("bench.haproxy")
	root, err := ca.New(td, "bench CA", 24*time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	write := func(name string, pems ...[]byte) {
		if err := os.WriteFile(filepath.Join(dir, name), bytes.Join(pems, nil), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	write("ca.pem", ca.EncodeCertPEM(root.Cert))
	for _, name := range []string{"server", "client"} {
		key, err := ca.NewKey()
		if err != nil {
			b.Fatal(err)
		}
		cert, err := root.Sign(ca.Leaf{ID: spiffeid.RequireFromPath(td, "/"+name), Key: key.Public(), TTL: 24 * time.Hour, DNSNames: []string{"app"}})
		if err != nil {
			b.Fatal(err)
		}
		keyPEM, err := ca.EncodeKeyPEM(key)
		if err != nil {
			b.Fatal(err)
		}
		write(name+".pem", ca.EncodeCertPEM(cert), keyPEM)
	}
}

func tcp(addr string) load.Dial {
	return func() (net.Conn, error) { return net.Dial("tcp", addr) }
}
