// Package proxy benchmarks the data plane: a client proxy and a server
// proxy (the built binary, mTLS between them, configured by a real spoke)
// against a direct connection to the same app, in the same run.
// `make bench` runs it once; `go test` alone runs no benchmark.
package proxy

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
)

const (
	rate      = 1000 // requests per second, over conns connections
	conns     = 10
	duration  = 5 * time.Second
	reqSize   = 128
	bulkBytes = 256 << 20
)

// apps: an echo server (latency) and a sink that counts what it got
// (throughput).
func apps(b *testing.B) (echo, sink string) {
	listen := func(serve func(net.Conn)) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); serve(c) }()
			}
		}()
		return ln.Addr().String()
	}
	echo = listen(func(c net.Conn) { _, _ = io.Copy(c, c) })
	sink = listen(func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d\n", n)
	})
	return echo, sink
}

func BenchmarkProxyPair(b *testing.B) {
	bin := harness.Binary(b)
	dir := b.TempDir()
	run := func(args ...string) string {
		out, err := harness.Run(bin, append([]string{"--config", filepath.Join(dir, "hub", "admin.conf")}, args...)...)
		if err != nil {
			b.Fatalf("meshfed %s: %v", strings.Join(args, " "), err)
		}
		return strings.TrimSpace(out)
	}
	hubAddr, hubHTTP := harness.FreePort(b), harness.FreePort(b)
	harness.Start(b, "hub", bin, "hub", "--data-dir", filepath.Join(dir, "hub"), "--listen", hubAddr, "--http-listen", hubHTTP, "--federation", "bench.meshfed")
	harness.WaitReady(b, hubHTTP, 30*time.Second)

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
	services := filepath.Join(dir, "services.yaml")
	ep := func(port string) string {
		return fmt.Sprintf("  endpoints: [{address: 127.0.0.31, port: %s, identity: spiffe://east.bench.meshfed/ns/default/sa/app, labels: {meshfed.io/node: server}}]\n", port)
	}
	content := "services:\n- namespace: default\n  name: echo\n  ports: [{port: 9080}]\n" + ep(echoPort) +
		"- namespace: default\n  name: sink\n  ports: [{port: 9081}]\n" + ep(sinkPort)
	if err := os.WriteFile(services, []byte(content), 0o600); err != nil {
		b.Fatal(err)
	}
	run("site", "add", "east", "--kind", "docker", "--region", "r1", "--zone", "z1", "--gateway-address", "127.0.0.31:15443")
	spokeHTTP, identity, xdsAddr := harness.FreePort(b), harness.FreePort(b), harness.FreePort(b)
	harness.Start(b, "spoke", bin, "spoke", "--site", "east", "--hub", hubAddr, "--token", run("site", "token", "create", "--site", "east"),
		"--data-dir", filepath.Join(dir, "east"), "--services", services, "--http-listen", spokeHTTP, "--identity-listen", identity, "--xds-listen", xdsAddr)
	harness.WaitReady(b, spokeHTTP, 30*time.Second)
	proxy := func(node string, args ...string) (*harness.Process, string) {
		http := harness.FreePort(b)
		p := harness.Start(b, "proxy-"+node, harness.Command(b, "meshfed-proxy"), append([]string{"--identity", identity, "--xds", xdsAddr, "--http-listen", http,
			"--token", run("vm", "token", "create", "--site", "east", "--node", node)}, args...)...)
		harness.WaitReady(b, http, 30*time.Second)
		return p, http
	}
	server, serverHTTP := proxy("server", "--workload", "spiffe://east.bench.meshfed/ns/default/sa/app", "--address", "127.0.0.31",
		"--inbound", echoPort+"="+echo, "--inbound", sinkPort+"="+sink, "--outbound-prefix", "-")
	client, clientHTTP := proxy("client", "--outbound-prefix", "127.110.0.0/16")
	var ls map[string]string
	deadline := time.Now().Add(30 * time.Second)
	for ls["echo.default:9080"] == "" || ls["sink.default:9081"] == "" {
		if time.Now().After(deadline) {
			b.Fatalf("the client proxy has no listeners for echo and sink: %v", ls)
		}
		time.Sleep(50 * time.Millisecond)
		body, _ := harness.GetText("http://" + clientHTTP + "/v1/listeners")
		_ = json.Unmarshal([]byte(body), &ls)
	}
	pEcho, pSink := ls["echo.default:9080"], ls["sink.default:9081"]
	// The first connections through the pair make its handshakes.
	if _, err := latency(pEcho, 200*time.Millisecond); err != nil {
		b.Fatalf("through the proxies: %v", err)
	}

	fmt.Printf("proxy benchmark: client proxy -> mTLS -> server proxy -> app, vs app directly; loopback, 2 cores\n")
	idle, _ := harness.Memory(client.Pid(), "VmRSS")
	fmt.Printf("client proxy RSS with its configuration, before traffic: %.1f MB\n", float64(idle)/1e6)
	direct, err := latency(echo, duration)
	if err != nil {
		b.Fatal(err)
	}
	proxied, err := latency(pEcho, duration)
	if err != nil {
		b.Fatal(err)
	}
	pct := func(l []time.Duration, q int) time.Duration { return l[min(len(l)-1, len(l)*q/100)] }
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	added50, added99 := pct(proxied, 50)-pct(direct, 50), pct(proxied, 99)-pct(direct, 99)
	fmt.Printf("latency at %d req/s over %d connections (%d B echo): direct p50 %.3f ms p99 %.3f ms; proxied p50 %.3f ms p99 %.3f ms\n",
		rate, conns, reqSize, ms(pct(direct, 50)), ms(pct(direct, 99)), ms(pct(proxied, 50)), ms(pct(proxied, 99)))
	fmt.Printf("added latency: p50 %.3f ms, p99 %.3f ms (target p99 <= 1 ms: %s)\n", ms(added50), ms(added99), verdict(added99 <= time.Millisecond))
	for _, n := range []int{1, 4} {
		d, err := throughput(sink, n)
		if err != nil {
			b.Fatal(err)
		}
		p, err := throughput(pSink, n)
		if err != nil {
			b.Fatal(err)
		}
		fmt.Printf("throughput over %d connection(s): direct %.0f MB/s, proxied %.0f MB/s, ratio %.2fx (target >= 0.8x: %s)\n", n, d/1e6, p/1e6, p/d, verdict(p/d >= 0.8))
		b.ReportMetric(p/d, fmt.Sprintf("throughput-ratio-%dconn", n))
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
		heap, _ := harness.Metric(pr.http, "go_memstats_heap_inuse_bytes")
		sys, _ := harness.Metric(pr.http, "go_memstats_sys_bytes")
		fmt.Printf("%s proxy RSS %.1f MB, peak %.1f MB (target <= 20 MB: %s); Go heap in use %.1f MB, Go runtime total %.1f MB\n",
			pr.name, float64(rss)/1e6, float64(peak)/1e6, verdict(peak <= 20e6), heap/1e6, sys/1e6)
	}
	b.ReportMetric(ms(added99), "added-p99-ms")
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// latency sends reqSize-byte requests at rate, spread over conns
// persistent connections, for d, and returns every round trip, sorted.
func latency(addr string, d time.Duration) ([]time.Duration, error) {
	var mu sync.Mutex
	var out []time.Duration
	errs := make(chan error, conns)
	var wg sync.WaitGroup
	interval := time.Second * conns / rate
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			req, resp := make([]byte, reqSize), make([]byte, reqSize)
			// Connections start spread over one interval.
			next := time.Now().Add(interval * time.Duration(i) / conns)
			end := time.Now().Add(d)
			var mine []time.Duration
			for next.Before(end) {
				time.Sleep(time.Until(next))
				start := time.Now()
				if _, err := c.Write(req); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, resp); err != nil {
					errs <- err
					return
				}
				mine = append(mine, time.Since(start))
				next = next.Add(interval)
			}
			mu.Lock()
			out = append(out, mine...)
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	slices.Sort(out)
	return out, nil
}

// throughput sends bulkBytes over n connections to a sink and returns
// bytes per second, counted when the sink confirms what it received.
func throughput(addr string, n int) (float64, error) {
	buf := make([]byte, 64<<10)
	start := time.Now()
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for sent := 0; sent < bulkBytes/n; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					errs <- err
					return
				}
			}
			_ = c.(*net.TCPConn).CloseWrite()
			var got int
			if _, err := fmt.Fscan(c, &got); err != nil || got < bulkBytes/n {
				errs <- fmt.Errorf("the sink got %d bytes: %v", got, err)
				return
			}
			errs <- nil
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			return 0, err
		}
	}
	return float64(bulkBytes) / time.Since(start).Seconds(), nil
}
