package e2e

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
)

// socketCut forwards a TCP address to the Docker socket until cut, so a
// test can take the engine away from the agent and give it back.
type socketCut struct {
	t     *testing.T
	addr  string
	mu    sync.Mutex
	ln    net.Listener
	conns []net.Conn
}

func newSocketCut(t *testing.T) *socketCut {
	s := &socketCut{t: t, addr: harness.FreePort(t)}
	s.restore()
	t.Cleanup(s.cut)
	return s
}

func (s *socketCut) restore() {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("unix", "/var/run/docker.sock")
			if err != nil {
				c.Close()
				continue
			}
			s.mu.Lock()
			s.conns = append(s.conns, c, d)
			s.mu.Unlock()
			go func() { _, _ = io.Copy(d, c); d.Close() }()
			go func() { _, _ = io.Copy(c, d); c.Close() }()
		}
	}()
}

// cut closes the listener and every forwarded connection.
func (s *socketCut) cut() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		s.ln.Close()
		s.ln = nil
	}
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

// endpointLines renders site's endpoints of default/<name> in spoke s's
// view, one line each, sorted.
func endpointLines(s *spokeProc, site, name string, line func(catalog.Endpoint) string) (string, error) {
	v, err := harness.View(s.http)
	if err != nil {
		return "", err
	}
	var out []string
	for _, svc := range v.Services {
		if svc.Site == site && svc.Namespace == "default" && svc.Name == name {
			for _, e := range svc.Endpoints {
				out = append(out, line(e))
			}
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n"), nil
}

// endpointLinesAre waits until endpointLines are want.
func endpointLinesAre(t *testing.T, within time.Duration, s *spokeProc, site, name string, line func(catalog.Endpoint) string, what, want string) {
	t.Helper()
	harness.Eventually(t, within, what, func() error {
		got, err := endpointLines(s, site, name, line)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("%s's endpoints of default/%s as %s sees them:\n%s\nwant:\n%s", site, name, s.site, got, want)
		}
		return nil
	})
}

// hostLine is a host's endpoint as "address health version container"
// (the port is the host proxy's pick).
func hostLine(e catalog.Endpoint) string {
	return fmt.Sprintf("%s %s %s %s", e.Address, e.Health, e.Labels["version"], e.Labels["meshfed.io/container"])
}

func hostEndpointsAre(t *testing.T, within time.Duration, s *spokeProc, site, name, what, want string) {
	t.Helper()
	endpointLinesAre(t, within, s, site, name, hostLine, what, want)
}

// httpApp serves "<name> <path>" over HTTP on loopback until the test ends.
func httpApp(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "%s %s\n", name, r.URL.Path) })}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// httpVia makes one GET of path through a proxy's outbound listener.
func httpVia(listener, path string) (string, error) {
	// A connection per call, so each is balanced anew.
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + listener + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(body)), err
}

// outboundRange is a /23 of 198.19.0.0/16 (RFC 2544's test range) for one
// run's host proxy: two workloads' /24s, apart from any other run's.
func outboundRange(t *testing.T) string {
	b := make([]byte, 1)
	_, _ = rand.Read(b)
	prefix := fmt.Sprintf("198.19.%d.0/23", b[0]&^1)
	// The agent removes its route on a clean stop; this covers a failed
	// test that killed it.
	t.Cleanup(func() { _ = exec.Command("ip", "route", "del", "local", prefix, "dev", "lo").Run() })
	return prefix
}

const vmPolicies = `service: default/echo
allow: [spiffe://west.test.meshfed/meshfed/node/west-client]
`

const greeterPolicy = `service: default/greeter
allow: [spiffe://dc1.test.meshfed/ns/default/sa/caller]
`

// TestVMAgentDocker runs a host agent against the real Docker engine: it
// discovers labelled containers on a network the test makes, another site
// sees them, with version and health, through the federation, and calls
// them through both sites' gateways; a container calls the other site by
// DNS name through the host proxy.
func TestVMAgentDocker(t *testing.T) {
	image := harness.ScratchImage(t, "test/echoapp")
	network := harness.DockerNetwork(t)
	gateway := harness.Docker(t, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network)
	f := newFederation(t)
	f.gateways["dc1"], f.gateways["west"] = freeAddr(t, "127.0.0.1"), freeAddr(t, "127.0.0.1")
	greeterIn := freeAddr(t, "127.0.0.23")
	dc1 := f.addSite("dc1", "z1", "")
	west := f.addSite("west", "z2", echoServices("greeter", "v1", "west", greeterIn))
	harness.WaitReady(t, dc1.http, 30*time.Second)
	harness.WaitReady(t, west.http, 30*time.Second)
	for _, pol := range []string{vmPolicies, greeterPolicy} {
		file := filepath.Join(f.dir, "policy.yaml")
		writeFile(t, file, pol)
		f.mustCLI("policy", "apply", "-f", file)
	}
	for _, s := range []*spokeProc{dc1, west} {
		f.startDataPlane(t, s, "gateway", s.site+"-gw", "--site", s.site, "--listen", f.gateways[s.site], "--drain-timeout", "1s")
	}
	host, port, _ := net.SplitHostPort(greeterIn)
	f.startProxy(t, west, "west-host", "--workload", "spiffe://west.test.meshfed/ns/default/sa/echo",
		"--address", host, "--inbound", port+"="+httpApp(t, "west"), "--outbound-prefix", "-")

	sock := newSocketCut(t)
	agentDir := filepath.Join(f.dir, "vmagent")
	agentHTTP := harness.FreePort(t)
	agentArgs := []string{"vmagent", "--spoke", dc1.identity, "--xds", dc1.xds, "--data-dir", agentDir, "--http-listen", agentHTTP,
		"--docker-host", "tcp://" + sock.addr, "--network", network, "--check-interval", "200ms", "--outbound-prefix", outboundRange(t)}
	token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "dc1", "--node", "host-7"))
	agent := harness.Start(t, "vmagent", f.bin, append(agentArgs, "--token", token)...)
	harness.WaitReady(t, agentHTTP, 30*time.Second)
	restartAgent := func() {
		agent.Kill()
		<-agent.Done()
		agent = harness.Start(t, "vmagent-restarted", f.bin, agentArgs...) // the test's t: it outlives the subtest
		harness.WaitReady(t, agentHTTP, 30*time.Second)
	}

	run := func(name string, labels ...string) (string, string) {
		args := []string{"run", "-d", "--name", name, "--network", network, "--dns", gateway, "-e", "NAME=" + name}
		for _, l := range labels {
			args = append(args, "-l", l)
		}
		harness.Docker(t, append(args, image)...)
		return name, harness.Docker(t, "inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", name)
	}
	echo := []string{"meshfed.io/service=echo", "meshfed.io/port=8080", "meshfed.io/health=/health"}
	a, _ := run(harness.Unique("echo-a"), append(echo, "meshfed.io/version=v2")...)
	b, ipB := run(harness.Unique("echo-b"), append(echo, "meshfed.io/version=v1")...)
	run(harness.Unique("plain")) // unlabelled: never exported
	lines := func(eps ...string) string { sort.Strings(eps); return strings.Join(eps, "\n") }
	// Behind the host proxy: every endpoint is at the host's address
	// towards the spoke (loopback here).
	epA := func(health string) string { return fmt.Sprintf("127.0.0.1 %s v2 %s", health, a) }
	epB := func(health string) string { return fmt.Sprintf("127.0.0.1 %s v1 %s", health, b) }

	t.Run("labelled containers appear in another site, with version and health", func(t *testing.T) {
		hostEndpointsAre(t, 20*time.Second, west, "dc1", "echo", "west sees both containers of dc1", lines(epA("healthy"), epB("healthy")))
		v, err := harness.View(west.http)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range v.Services {
			if s.Site == "dc1" && s.Name != "echo" {
				t.Errorf("dc1 exports %s, which no labelled container serves", s.ID())
			}
		}
	})

	t.Run("a caller in another site reaches the containers through both gateways, with its SPIFFE ID checked", func(t *testing.T) {
		client := f.startProxy(t, west, "west-client", "--outbound-prefix", "127.103.0.0/16")
		echoVia := client.listener(t, "echo.default:8080")
		seen := map[string]bool{}
		harness.Eventually(t, 20*time.Second, "west's calls reach both containers", func() error {
			got, err := httpVia(echoVia, "/hi")
			if err != nil {
				return err
			}
			seen[got] = true
			if !seen[a+" /hi"] || !seen[b+" /hi"] {
				return fmt.Errorf("answers so far: %v", seen)
			}
			return nil
		})
		// The same path, by a caller the policy does not list: refused at
		// the host proxy, which checks the caller's SPIFFE ID.
		stranger := f.startProxy(t, west, "west-stranger", "--outbound-prefix", "127.104.0.0/16")
		strangerVia := stranger.listener(t, "echo.default:8080")
		if got, err := httpVia(strangerVia, "/hi"); err == nil {
			t.Errorf("a caller the policy does not allow got an answer: %q", got)
		}
	})

	t.Run("a container calls another site's service by its DNS name", func(t *testing.T) {
		caller, _ := run(harness.Unique("caller"), "meshfed.io/service=caller", "meshfed.io/port=8080")
		get := func(url string) (string, error) {
			out, err := exec.Command("docker", "exec", caller, "/app", "get", url).CombinedOutput()
			return strings.TrimSpace(string(out)), err
		}
		harness.Eventually(t, 30*time.Second, "the caller container reaches west's greeter by name", func() error {
			got, err := get("http://greeter.default.svc.clusterset.local:9080/hello")
			if err != nil || got != "west /hello" {
				return fmt.Errorf("got %q (%v)", got, err)
			}
			return nil
		})
		if got, err := get("http://nope.default.svc.clusterset.local:9080/"); err == nil || !strings.Contains(got, "no such host") {
			t.Errorf("an unknown federated name: got %q (%v), want no such host (NXDOMAIN)", got, err)
		}
		// echo-a is not allowed to call greeter: its workload's SVID is not
		// the caller's.
		out, err := exec.Command("docker", "exec", a, "/app", "get", "http://greeter.default.svc.clusterset.local:9080/").CombinedOutput()
		if err == nil {
			t.Errorf("echo's workload reached greeter, whose policy allows only the caller: %s", out)
		}
		harness.Docker(t, "rm", "-f", caller)
	})

	t.Run("a failing health check makes the endpoint unhealthy", func(t *testing.T) {
		resp, err := http.Get("http://" + net.JoinHostPort(ipB, "8080") + "/sick")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "echo-b goes unhealthy", lines(epA("healthy"), epB("unhealthy")))
	})

	t.Run("a stopped container leaves the catalog", func(t *testing.T) {
		harness.Docker(t, "stop", "-t", "1", a)
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "echo-a leaves", epB("unhealthy"))
		harness.Docker(t, "start", a)
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "echo-a is back", lines(epA("healthy"), epB("unhealthy")))
	})

	t.Run("a restarted agent needs no token and duplicates nothing", func(t *testing.T) {
		restartAgent()
		if !strings.Contains(agent.Log(), "using the SVID kept in the data dir") {
			t.Errorf("the restarted agent did not start from its kept SVID:\n%s", agent.Log())
		}
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "the same two endpoints after the restart", lines(epA("healthy"), epB("unhealthy")))
	})

	t.Run("cut from the Docker socket, the agent keeps its containers and resyncs", func(t *testing.T) {
		sock.cut()
		harness.Eventually(t, 10*time.Second, "the agent notices Docker is gone", func() error {
			n, err := harness.Metric(agentHTTP, "meshfed_vmagent_docker_errors_total")
			if err != nil || n == 0 {
				return fmt.Errorf("docker errors %v (%v)", n, err)
			}
			return nil
		})
		// While cut, echo-a stops: Docker cannot tell the agent, so the
		// endpoint stays, and the agent's own check marks it unhealthy.
		harness.Docker(t, "stop", "-t", "1", a)
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "echo-a stays, unhealthy, while Docker is out of reach", lines(epA("unhealthy"), epB("unhealthy")))
		sock.restore()
		hostEndpointsAre(t, 15*time.Second, west, "dc1", "echo", "the agent relists and echo-a leaves", epB("unhealthy"))
	})

	t.Run("bad node tokens are refused, each with its message, and leave no host", func(t *testing.T) {
		created := time.Now()
		expiring := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "dc1", "--node", "host-x", "--ttl", "1s"))
		westToken := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "west", "--node", "host-w"))
		harness.Eventually(t, 5*time.Second, "the 1s token's lifetime passes", func() error {
			if time.Since(created) < 1500*time.Millisecond {
				return errors.New("not yet")
			}
			return nil
		})
		for _, c := range []struct{ what, token, want string }{
			{"replayed", token, "already used"},
			{"expired", expiring, "expired"},
			{"for another site", westToken, "not of the site the node token is for"},
			{"malformed", "mf1.not-a-token", "node token"},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			cmd := exec.CommandContext(ctx, f.bin, "vmagent", "--spoke", dc1.identity, "--data-dir", t.TempDir(), "--http-listen", "-", "--docker-host", "-", "--token", c.token)
			out, err := cmd.CombinedOutput()
			timedOut := ctx.Err() != nil
			cancel()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || timedOut {
				t.Errorf("a %s token: the agent did not exit with an error (%v):\n%s", c.what, err, out)
				continue
			}
			if !strings.Contains(string(out), c.want) {
				t.Errorf("a %s token: want a message with %q, got:\n%s", c.what, c.want, out)
			}
		}
		out := f.mustCLI("vm", "list", "-o", "json")
		for _, node := range []string{"host-x", "host-w"} {
			if strings.Contains(out, node) {
				t.Errorf("a refused token left host %s at the hub:\n%s", node, out)
			}
		}
	})

	t.Run("the spoke's site status lists the host", func(t *testing.T) {
		harness.Eventually(t, 10*time.Second, "vm list shows host-7", func() error {
			out, err := f.cli("vm", "list")
			if err != nil {
				return err
			}
			if !strings.Contains(out, "host-7") || !strings.Contains(out, "dc1") {
				return fmt.Errorf("vm list:\n%s", out)
			}
			return nil
		})
	})

	t.Run("a removed host's endpoints leave, its agent stops, its credential is refused", func(t *testing.T) {
		if out := f.mustCLI("vm", "remove", "host-7"); !strings.Contains(out, "removed from site dc1") {
			t.Errorf("vm remove says:\n%s", out)
		}
		hostEndpointsAre(t, 10*time.Second, west, "dc1", "echo", "west no longer sees host-7's containers", "")
		select {
		case <-agent.Done():
		case <-time.After(15 * time.Second):
			t.Fatal("the removed host's agent still runs")
		}
		if !strings.Contains(agent.Log(), "removed from site dc1") {
			t.Errorf("the agent stopped without saying it was removed:\n%s", agent.Log())
		}
		// Started again on its data dir, the SVID it keeps is refused.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, f.bin, agentArgs...).CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || ctx.Err() != nil || !strings.Contains(string(out), "create a new node token") {
			t.Errorf("the removed host's agent, restarted: %v, want an exit saying to create a new node token:\n%s", err, out)
		}
		harness.Eventually(t, 10*time.Second, "vm list no longer shows host-7", func() error {
			if out := f.mustCLI("vm", "list"); strings.Contains(out, "host-7") {
				return fmt.Errorf("vm list:\n%s", out)
			}
			return nil
		})
	})
}

// TestVMAgentImage runs the agent (meshfed-vmagent) as the container
// deploy/vm/Dockerfile makes, the way its comment says: host network, the Docker socket
// mounted, no capability but the two the host proxy needs. A labelled
// container on the host shows in another site.
func TestVMAgentImage(t *testing.T) {
	network := harness.DockerNetwork(t)
	app := harness.ScratchImage(t, "test/echoapp")
	f := newFederation(t)
	dc1 := f.addSite("dc1", "z1", "")
	west := f.addSite("west", "z2", "services: []\n")
	harness.WaitReady(t, dc1.http, 30*time.Second)
	harness.WaitReady(t, west.http, 30*time.Second)

	dir := t.TempDir()
	if out, err := exec.Command("cp", harness.Command(t, "meshfed-vmagent"), filepath.Join(dir, "meshfed-vmagent")).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	dockerfile, err := os.ReadFile("../../deploy/vm/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	image := harness.BuildImage(t, dir, string(dockerfile))
	token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "dc1", "--node", "host-c"))
	prefix := outboundRange(t)
	agentHTTP := harness.FreePort(t)
	name := harness.Unique("vmagent")
	// Removed before the route is (cleanups run last first), with its
	// data volume.
	t.Cleanup(func() { _ = exec.Command("docker", "rm", "-f", "-v", name).Run() })
	harness.Docker(t, "run", "-d", "--name", name, "--network", "host", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_BIND_SERVICE",
		"-v", "/var/run/docker.sock:/var/run/docker.sock", "-e", "MESHFED_TOKEN="+token, image,
		"--spoke", dc1.identity, "--xds", dc1.xds, "--network", network, "--http-listen", agentHTTP, "--outbound-prefix", prefix)
	logs := func() string { out, _ := exec.Command("docker", "logs", name).CombinedOutput(); return string(out) }
	harness.Eventually(t, 30*time.Second, "the agent container is ready", func() error {
		if _, err := harness.GetText("http://" + agentHTTP + "/readyz"); err != nil {
			return fmt.Errorf("%v; its log:\n%s", err, logs())
		}
		return nil
	})
	echo := harness.Unique("echo")
	harness.Docker(t, "run", "-d", "--name", echo, "--network", network, "-l", "meshfed.io/service=echo", "-l", "meshfed.io/port=8080", "-l", "meshfed.io/version=v3", app)
	hostEndpointsAre(t, 20*time.Second, west, "dc1", "echo", "west sees the container the agent container found", "127.0.0.1 healthy v3 "+echo)
	if out := logs(); !strings.Contains(out, "workload proxy started") {
		t.Errorf("the agent container runs no host proxy:\n%s", out)
	}
}
