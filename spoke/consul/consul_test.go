package consul

import (
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/catalog"
)

func entry(node, id, addr string, port int, status string) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node:    &api.Node{Node: node, Address: "10.0.0.1", Meta: map[string]string{}},
		Service: &api.AgentService{ID: id, Service: "web", Address: addr, Port: port, Meta: map[string]string{}},
		Checks:  api.HealthChecks{{Status: status}},
	}
}

// endpoints turns Consul instances into endpoints: health from the checks,
// meta and tags as labels, node meta as locality; it skips meshfed's own
// registrations and instances that cannot be endpoints.
func TestEndpoints(t *testing.T) {
	s, err := New(Options{Client: &api.Client{}, ExportTag: "meshfed-export"})
	if err != nil {
		t.Fatal(err)
	}
	ok := entry("n1", "web-1", "10.0.0.7", 8080, api.HealthPassing)
	ok.Service.Meta["version"] = "v2"
	ok.Service.Meta["bad key!"] = "x"
	ok.Service.Tags = []string{"meshfed-export", "blue"}
	ok.Node.Meta["region"], ok.Node.Meta["zone"] = "eu", "eu-1"
	warn := entry("n1", "web-2", "", 8081, api.HealthWarning) // the node's address
	crit := entry("n2", "web-1", "10.0.0.9", 8080, api.HealthCritical)
	own := entry("meshfed-west", "web-west", "10.0.0.10", 8080, api.HealthPassing)
	own.Node.Meta[MetaExternalSource] = ExternalSource
	dup := entry("n1", "web-1", "10.0.0.11", 8080, api.HealthPassing)
	badPort := entry("n3", "web-3", "10.0.0.12", 70000, api.HealthPassing)
	badAddr := entry("n3", "web-4", "not an address!", 8080, api.HealthPassing)

	var got []string
	for _, e := range s.endpoints("web", []*api.ServiceEntry{ok, warn, crit, own, dup, badPort, badAddr}) {
		got = append(got, fmt.Sprintf("%s:%d %s %s/%s version=%s blue=%s warn=%s bad=%q", e.Address, e.Port, e.Health, e.Region, e.Zone,
			e.Labels["version"], e.Labels["consul.io/tag.blue"], e.Labels["consul-health"], e.Labels["bad key!"]))
	}
	want := []string{
		"10.0.0.1:8081 unhealthy / version= blue= warn=warning bad=\"\"",
		"10.0.0.7:8080 healthy eu/eu-1 version=v2 blue=true warn= bad=\"\"",
		"10.0.0.9:8080 unhealthy / version= blue= warn= bad=\"\"",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("endpoints:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if h := catalog.HealthHealthy; !strings.Contains(got[1], h) {
		t.Errorf("a passing instance is not %s", h)
	}
}

func TestNextIndex(t *testing.T) {
	for _, c := range []struct{ prev, last, want uint64 }{
		{0, 0, 1},   // never below 1
		{5, 9, 9},   // moved on
		{9, 9, 9},   // a timeout: the same index
		{9, 3, 0},   // went backwards: start over
		{0, 42, 42}, // the first answer
	} {
		if got := nextIndex(c.prev, c.last); got != c.want {
			t.Errorf("nextIndex(%d, %d) = %d, want %d", c.prev, c.last, got, c.want)
		}
	}
}
