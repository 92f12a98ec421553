package e2e

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
)

// consulLine is a Consul instance's endpoint as "address:port health
// version".
func consulLine(e catalog.Endpoint) string {
	return fmt.Sprintf("%s:%d %s %s", e.Address, e.Port, e.Health, e.Labels["version"])
}

func consulEndpoints(s *spokeProc, site, name string) (string, error) {
	return endpointLines(s, site, name, consulLine)
}

func consulEndpointsAre(t *testing.T, within time.Duration, s *spokeProc, site, name, what, want string) {
	t.Helper()
	endpointLinesAre(t, within, s, site, name, consulLine, what, want)
}

// TestConsulSource: a site of kind consul whose spoke follows a real Consul
// agent: a tagged service appears in another site, goes unhealthy with its
// check and leaves when deregistered; untagged services, meshfed's own
// registrations and instances that cannot be endpoints are not exported.
func TestConsulSource(t *testing.T) {
	c := harness.StartConsul(t, "dc1")
	f := newFederation(t)
	f.kinds["dc1"] = "consul"
	dc1 := f.addSite("dc1", "z1", "", "--consul-addr", "http://"+c.Addr, "--consul-empty-grace", "3s")
	west := f.addSite("west", "z2", "services: []\n")
	harness.WaitReady(t, dc1.http, 30*time.Second)
	harness.WaitReady(t, west.http, 30*time.Second)

	agent := c.Client.Agent()
	register := func(s *api.AgentServiceRegistration) {
		t.Helper()
		if err := agent.ServiceRegister(s); err != nil {
			t.Fatal(err)
		}
	}
	ttl := func(id string) *api.AgentServiceCheck {
		return &api.AgentServiceCheck{CheckID: "check-" + id, TTL: "1h", Status: api.HealthPassing}
	}
	register(&api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.41", Tags: []string{"meshfed-export"}, Meta: map[string]string{"version": "v2"}, Check: ttl("web-1")})
	register(&api.AgentServiceRegistration{ID: "web-2", Name: "web", Port: 8080, Address: "127.0.0.42", Tags: []string{"meshfed-export"}, Meta: map[string]string{"version": "v1"}, Check: ttl("web-2")})
	register(&api.AgentServiceRegistration{ID: "hidden", Name: "hidden", Port: 8080, Address: "127.0.0.43"})
	register(&api.AgentServiceRegistration{ID: "Bad_Name", Name: "Bad_Name", Port: 8080, Address: "127.0.0.44", Tags: []string{"meshfed-export"}})
	// What the to-Consul side registers: never imported back.
	if _, err := c.Client.Catalog().Register(&api.CatalogRegistration{Node: "meshfed-west", Address: "127.0.0.45",
		NodeMeta: map[string]string{"external-source": "meshfed", "meshfed-site": "west"},
		Service:  &api.AgentService{ID: "web-west", Service: "web", Port: 8080, Tags: []string{"meshfed", "meshfed-export"}}}, nil); err != nil {
		t.Fatal(err)
	}

	consulEndpointsAre(t, 20*time.Second, west, "dc1", "web", "west sees both instances of Consul's web",
		"127.0.0.41:8080 healthy v2\n127.0.0.42:8080 healthy v1")
	v, err := harness.View(west.http)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range v.Services {
		if s.Site == "dc1" && s.Name != "web" {
			t.Errorf("dc1 exports %s, which is untagged or not a meshfed name", s.ID())
		}
	}

	if err := agent.UpdateTTL("check-web-2", "down", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	consulEndpointsAre(t, 10*time.Second, west, "dc1", "web", "web-2 goes unhealthy with its check",
		"127.0.0.41:8080 healthy v2\n127.0.0.42:8080 unhealthy v1")
	if err := agent.ServiceDeregister("web-1"); err != nil {
		t.Fatal(err)
	}
	consulEndpointsAre(t, 10*time.Second, west, "dc1", "web", "web-1 leaves when deregistered", "127.0.0.42:8080 unhealthy v1")

	t.Run("Consul out of reach: the last state stays, the hub shows why", func(t *testing.T) {
		c.Stop()
		harness.Eventually(t, 15*time.Second, "site list shows dc1's source failing", func() error {
			out := f.mustCLI("site", "show", "dc1")
			if !strings.Contains(out, "consul") || !strings.Contains(out, "last state") {
				return fmt.Errorf("site show dc1:\n%s", out)
			}
			return nil
		})
		consulEndpointsAre(t, time.Second, west, "dc1", "web", "web-2 stays while Consul is down", "127.0.0.42:8080 unhealthy v1")
	})

	t.Run("Consul back: the sync resumes, nothing lost or doubled", func(t *testing.T) {
		c.Start()
		register(&api.AgentServiceRegistration{ID: "web-3", Name: "web", Port: 8080, Address: "127.0.0.46", Tags: []string{"meshfed-export"}, Check: ttl("web-3")})
		consulEndpointsAre(t, 20*time.Second, west, "dc1", "web", "web-2 kept, web-3 new, once each",
			"127.0.0.42:8080 unhealthy v1\n127.0.0.46:8080 healthy ")
		harness.Eventually(t, 15*time.Second, "site show dc1: the source is ok again", func() error {
			if out := f.mustCLI("site", "show", "dc1"); strings.Contains(out, "last state") {
				return fmt.Errorf("site show dc1:\n%s", out)
			}
			return nil
		})
	})

	t.Run("a Consul with no exported service at all is held for the grace, then withdrawn", func(t *testing.T) {
		for _, id := range []string{"web-2", "web-3"} {
			if err := agent.ServiceDeregister(id); err != nil {
				t.Fatal(err)
			}
		}
		harness.Eventually(t, 10*time.Second, "site show says the empty answer is held, and west still has web", func() error {
			out := f.mustCLI("site", "show", "dc1")
			got, err := consulEndpoints(west, "dc1", "web")
			if err != nil || !strings.Contains(out, "holding the last") || got == "" {
				return fmt.Errorf("site show dc1:\n%s\nwest's web of dc1: %q (%v)", out, got, err)
			}
			return nil
		})
		consulEndpointsAre(t, 15*time.Second, west, "dc1", "web", "after the grace, web leaves", "")
	})
}

// TestConsulRegistersFederatedServices: the Consul site's spoke registers
// another site's service in Consul at the listener of the site's proxy; a
// plain HTTP client that looks it up in Consul (HTTP API, then DNS) and
// connects reaches the app in the other site through that proxy and the
// other site's gateway, with the proxy's SPIFFE ID checked by policy. A
// spoke restart writes nothing to Consul.
func TestConsulRegistersFederatedServices(t *testing.T) {
	c := harness.StartConsul(t, "dc1")
	f := newFederation(t)
	f.kinds["dc1"] = "consul"
	f.gateways["west"] = freeAddr(t, "127.0.0.1")
	greeterIn := freeAddr(t, "127.0.0.23")
	prefix := "127.131.0.0/16"
	dc1 := f.addSite("dc1", "z1", "", "--consul-addr", "http://"+c.Addr, "--consul-register-prefix", prefix)
	west := f.addSite("west", "z2", echoServices("greeter", "v1", "west", greeterIn))
	harness.WaitReady(t, dc1.http, 30*time.Second)
	harness.WaitReady(t, west.http, 30*time.Second)
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, "service: default/greeter\nallow: [spiffe://dc1.test.meshfed/meshfed/node/consul-clients]\n")
	f.mustCLI("policy", "apply", "-f", policy)
	f.startDataPlane(t, west, "gateway", "west-gw", "--site", "west", "--listen", f.gateways["west"], "--drain-timeout", "1s")
	host, port, _ := net.SplitHostPort(greeterIn)
	f.startProxy(t, west, "west-host", "--workload", "spiffe://west.test.meshfed/ns/default/sa/echo",
		"--address", host, "--inbound", port+"="+httpApp(t, "west"), "--outbound-prefix", "-")
	f.startProxy(t, dc1, "consul-clients", "--outbound-prefix", prefix)

	var inst *api.CatalogService
	harness.Eventually(t, 20*time.Second, "greeter of west is registered in Consul", func() error {
		svcs, _, err := c.Client.Catalog().Service("greeter", "", nil)
		if err != nil {
			return err
		}
		if len(svcs) != 1 {
			return fmt.Errorf("%d instances of greeter in Consul", len(svcs))
		}
		inst = svcs[0]
		return nil
	})
	if inst.Node != "meshfed-west" || inst.NodeMeta["external-source"] != "meshfed" || inst.NodeMeta["meshfed-site"] != "west" ||
		!slices.Contains(inst.ServiceTags, "meshfed") || inst.ServiceMeta["meshfed-service"] != "default/greeter" ||
		!strings.HasPrefix(inst.ServiceAddress, "127.131.") || inst.ServicePort != 9080 {
		t.Errorf("greeter in Consul: node %s %v, tags %v, meta %v, at %s:%d", inst.Node, inst.NodeMeta, inst.ServiceTags, inst.ServiceMeta, inst.ServiceAddress, inst.ServicePort)
	}
	harness.Eventually(t, 20*time.Second, "a client that found greeter in Consul's API reaches west", func() error {
		got, err := httpVia(net.JoinHostPort(inst.ServiceAddress, strconv.Itoa(inst.ServicePort)), "/api")
		if err != nil || got != "west /api" {
			return fmt.Errorf("got %q (%v)", got, err)
		}
		return nil
	})
	dns := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, c.DNS)
	}}
	addrs, err := dns.LookupHost(context.Background(), "greeter.service.consul")
	if err != nil || len(addrs) != 1 {
		t.Fatalf("greeter.service.consul at Consul's DNS: %v, %v", addrs, err)
	}
	if got, err := httpVia(net.JoinHostPort(addrs[0], "9080"), "/dns"); err != nil || got != "west /dns" {
		t.Errorf("a client that found greeter in Consul's DNS: %q (%v)", got, err)
	}
	health, _, err := c.Client.Health().Checks("greeter", nil)
	if err != nil || len(health) != 1 || health[0].Status != api.HealthPassing {
		t.Errorf("greeter's check in Consul: %v (%v)", health, err)
	}

	t.Run("a spoke restart with nothing changed writes nothing to Consul", func(t *testing.T) {
		f.restartSpoke(dc1)
		harness.Eventually(t, 20*time.Second, "the restarted spoke has compared its registrations with Consul", func() error {
			n, err := harness.Metric(dc1.http, "meshfed_consul_services_registered")
			if err != nil || n != 1 {
				return fmt.Errorf("registered %v (%v)", n, err)
			}
			return nil
		})
		if n, err := harness.Metric(dc1.http, "meshfed_consul_writes_total"); err != nil || n != 0 {
			t.Errorf("the restarted spoke wrote %v times to Consul (%v), want 0", n, err)
		}
		svcs, _, err := c.Client.Catalog().Service("greeter", "", nil)
		if err != nil || len(svcs) != 1 || svcs[0].ModifyIndex != inst.ModifyIndex {
			t.Errorf("greeter in Consul after the restart: %v (%v), modify index was %d", svcs, err, inst.ModifyIndex)
		}
	})

	t.Run("Consul stopped and started again: greeter is there once, still reachable", func(t *testing.T) {
		c.Stop()
		c.Start()
		harness.Eventually(t, 20*time.Second, "greeter once in Consul and reachable", func() error {
			svcs, _, err := c.Client.Catalog().Service("greeter", "", nil)
			if err != nil || len(svcs) != 1 {
				return fmt.Errorf("%d instances of greeter (%v)", len(svcs), err)
			}
			got, err := httpVia(net.JoinHostPort(svcs[0].ServiceAddress, strconv.Itoa(svcs[0].ServicePort)), "/again")
			if err != nil || got != "west /again" {
				return fmt.Errorf("got %q (%v)", got, err)
			}
			return nil
		})
	})
}

// TestConsulSitesBothWaysDoNotLoop: two Consul sites sync both ways; a
// service of dc1's Consul shows in dc2's Consul as meshfed's, and never
// comes back: neither datacenter nor the federation grows.
func TestConsulSitesBothWaysDoNotLoop(t *testing.T) {
	c1, c2 := harness.StartConsul(t, "dc1"), harness.StartConsul(t, "dc2")
	f := newFederation(t)
	f.kinds["dc1"], f.kinds["dc2"] = "consul", "consul"
	s1 := f.addSite("dc1", "z1", "", "--consul-addr", "http://"+c1.Addr, "--consul-register-prefix", "127.132.0.0/16")
	s2 := f.addSite("dc2", "z2", "", "--consul-addr", "http://"+c2.Addr, "--consul-register-prefix", "127.133.0.0/16")
	harness.WaitReady(t, s1.http, 30*time.Second)
	harness.WaitReady(t, s2.http, 30*time.Second)
	if err := c1.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.41", Tags: []string{"meshfed-export"}}); err != nil {
		t.Fatal(err)
	}
	instances := func(c *harness.Consul) (string, error) {
		svcs, _, err := c.Client.Catalog().Service("web", "", nil)
		if err != nil {
			return "", err
		}
		var out []string
		for _, s := range svcs {
			out = append(out, s.Node)
		}
		slices.Sort(out)
		return strings.Join(out, ","), nil
	}
	harness.Eventually(t, 20*time.Second, "dc2's Consul has dc1's web, registered by meshfed", func() error {
		got, err := instances(c2)
		if err != nil || got != "meshfed-dc1" {
			return fmt.Errorf("web in dc2's Consul on nodes %q (%v)", got, err)
		}
		return nil
	})
	// Round trips: both spokes resync with Consul on every change and
	// every 30s; several changes later, nothing has come back.
	for i := range 5 {
		if err := c1.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.41", Tags: []string{"meshfed-export"}, Meta: map[string]string{"round": strconv.Itoa(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	harness.Eventually(t, 20*time.Second, "both spokes have caught up with the rounds", func() error {
		v, err := harness.View(s2.http)
		if err != nil {
			return err
		}
		for _, s := range v.Services {
			if s.Site == "dc1" && s.Name == "web" && len(s.Endpoints) == 1 && s.Endpoints[0].Labels["round"] == "4" {
				return nil
			}
		}
		return fmt.Errorf("dc2's view: %v", v.Services)
	})
	if got, err := instances(c1); err != nil || got != "consul-dc1" {
		t.Errorf("web in dc1's Consul on nodes %q (%v): want only its own instance, nothing re-imported", got, err)
	}
	if got, err := instances(c2); err != nil || got != "meshfed-dc1" {
		t.Errorf("web in dc2's Consul on nodes %q (%v): want one meshfed registration", got, err)
	}
	out, err := catalogVia(f.cli)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "dc2") {
		t.Errorf("dc2 exports what meshfed registered in its Consul:\n%s", out)
	}
}

// consulSyncRules are the README's minimal ACL rules for syncing both ways.
const consulSyncRules = `service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
node_prefix "meshfed-" { policy = "write" }
`

// TestConsulACL: with ACLs on and deny by default, a token with the
// README's rules is enough to sync both ways.
func TestConsulACL(t *testing.T) {
	c := harness.StartConsulACL(t, "dc1")
	pol, _, err := c.Client.ACL().PolicyCreate(&api.ACLPolicy{Name: "meshfed-sync", Rules: consulSyncRules}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := c.Client.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: pol.ID}}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(t.TempDir(), "acl.token")
	writeFile(t, tokenFile, tok.SecretID+"\n")
	f := newFederation(t)
	f.kinds["dc1"] = "consul"
	dc1 := f.addSite("dc1", "z1", "", "--consul-addr", "http://"+c.Addr, "--consul-token-file", tokenFile, "--consul-register-prefix", "127.135.0.0/16")
	west := f.addSite("west", "z2", echoServices("greeter", "v1", "west", "127.0.0.23:9080"))
	harness.WaitReady(t, dc1.http, 30*time.Second)
	harness.WaitReady(t, west.http, 30*time.Second)
	if err := c.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "127.0.0.41", Tags: []string{"meshfed-export"}}); err != nil {
		t.Fatal(err)
	}
	consulEndpointsAre(t, 20*time.Second, west, "dc1", "web", "west sees web, read with the sync's token", "127.0.0.41:8080 healthy ")
	harness.Eventually(t, 20*time.Second, "greeter registered with the sync's token", func() error {
		svcs, _, err := c.Client.Catalog().Service("greeter", "", nil)
		if err != nil || len(svcs) != 1 {
			return fmt.Errorf("%d instances of greeter (%v)", len(svcs), err)
		}
		return nil
	})
	if n, err := harness.Metric(dc1.http, "meshfed_consul_register_errors_total"); err != nil || n != 0 {
		t.Errorf("register errors: %v (%v)", n, err)
	}
}
