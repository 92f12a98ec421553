package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/test/harness"
)

// consulEndpoints renders site's endpoints of default/<name> in spoke s's
// view as sorted "address:port health version" lines.
func consulEndpoints(s *spokeProc, site, name string) (string, error) {
	v, err := harness.View(s.http)
	if err != nil {
		return "", err
	}
	var out []string
	for _, svc := range v.Services {
		if svc.Site == site && svc.Namespace == "default" && svc.Name == name {
			for _, e := range svc.Endpoints {
				out = append(out, fmt.Sprintf("%s:%d %s %s", e.Address, e.Port, e.Health, e.Labels["version"]))
			}
		}
	}
	return strings.Join(out, "\n"), nil
}

func consulEndpointsAre(t *testing.T, within time.Duration, s *spokeProc, site, name, what, want string) {
	t.Helper()
	harness.Eventually(t, within, what, func() error {
		got, err := consulEndpoints(s, site, name)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("%s's endpoints of default/%s as %s sees them:\n%s\nwant:\n%s", site, name, s.site, got, want)
		}
		return nil
	})
}

// TestConsulSource: a site of kind consul whose spoke follows a real Consul
// agent: a tagged service appears in another site, goes unhealthy with its
// check and leaves when deregistered; untagged services, meshfed's own
// registrations and instances that cannot be endpoints are not exported.
func TestConsulSource(t *testing.T) {
	c := harness.StartConsul(t, "dc1")
	f := newFederation(t)
	f.kinds["dc1"] = "consul"
	dc1 := f.addSite("dc1", "z1", "", "--consul-addr", "http://"+c.Addr)
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
}
