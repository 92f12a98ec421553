package xds

import (
	"fmt"
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/meshfed/meshfed/catalog"
)

func testCatalog() *Catalog {
	ep := func(addr, zone, version string, health string) catalog.Endpoint {
		return catalog.Endpoint{Address: addr, Port: 8080, Region: "us", Zone: zone, Health: health,
			Labels: map[string]string{"version": version}, Identity: "spiffe://c.test/ns/default/sa/echo"}
	}
	return &Catalog{
		Federation: "fed.test",
		Site:       "c",
		Sites: map[string]catalog.Site{
			"c":    {Name: "c", Locality: catalog.Locality{Region: "us", Zone: "us-1"}},
			"east": {Name: "east", Locality: catalog.Locality{Region: "eu", Zone: "eu-1"}, GatewayAddresses: []string{"10.0.0.1:15443", "gw.east.test:15443"}},
			"west": {Name: "west", Locality: catalog.Locality{Region: "ap", Zone: "ap-1"}, GatewayAddresses: []string{"10.0.1.1:15443"}},
		},
		Services: []catalog.Service{
			{Site: "c", Namespace: "default", Name: "echo", Ports: []catalog.Port{{Name: "http", Port: 8080}}, Endpoints: []catalog.Endpoint{
				ep("10.1.0.1", "us-1", "v1", ""), ep("10.1.0.2", "us-2", "v2", catalog.HealthUnhealthy),
			}},
			{Site: "east", Namespace: "default", Name: "echo", Ports: []catalog.Port{{Name: "http", Port: 8080}}, Endpoints: []catalog.Endpoint{
				{Address: "10.2.0.1", Port: 8080, Labels: map[string]string{"version": "v1"}},
			}},
			{Site: "west", Namespace: "default", Name: "echo", Ports: []catalog.Port{{Name: "http", Port: 8080}}, Endpoints: []catalog.Endpoint{
				{Address: "10.3.0.1", Port: 8080, Health: catalog.HealthUnhealthy},
			}},
		},
		Policies: map[string]catalog.Policy{"default/echo": {
			Service: "default/echo", Failover: []string{"west", "east"}, Retries: ptr(uint32(1)),
			Split: []catalog.Split{{Name: "stable", Weight: 90, Labels: map[string]string{"version": "v1"}}, {Name: "canary", Weight: 10, Labels: map[string]string{"version": "v2"}}},
			Allow: []string{"spiffe://c.test/ns/default/sa/client", "spiffe://east.test/*"},
		}},
		Bundles: map[string][]byte{"c.test": []byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")},
	}
}

type validator interface{ Validate() error }

func TestBuildIsValidEnvoy(t *testing.T) {
	c := testCatalog()
	for _, n := range []Node{
		{ID: "spiffe://c.test/ns/default/sa/echo", Address: "10.1.0.1", Inbound: map[uint32]string{8080: "127.0.0.1:9080"}, OutboundPrefix: netip.MustParsePrefix("127.128.0.0/9")},
		{ID: "spiffe://c.test/ns/default/sa/client", GRPC: true},
		// A proxyless gRPC server: the workload of c's endpoints.
		{ID: "spiffe://c.test/ns/default/sa/echo", GRPC: true},
	} {
		res := Build(c, n, SVID{CertPEM: []byte("cert"), KeyPEM: []byte("key")})
		total := 0
		for typ, rs := range res {
			for _, r := range rs {
				total++
				if err := r.(validator).Validate(); err != nil {
					t.Errorf("%s: %v", typ, err)
				}
			}
		}
		// 3 clusters (all, stable, canary) with their endpoints, a listener.
		if len(res[resource.ClusterType]) < 3 || len(res[resource.EndpointType]) != 3 || len(res[resource.ListenerType]) < 1 {
			t.Errorf("node %s: got %d clusters, %d load assignments, %d listeners", n.ID, len(res[resource.ClusterType]), len(res[resource.EndpointType]), len(res[resource.ListenerType]))
		}
		if !n.GRPC && len(res[resource.ListenerType]) != 2 {
			t.Errorf("want an outbound and an inbound listener, got %d", len(res[resource.ListenerType]))
		}
	}
}

func TestPriorities(t *testing.T) {
	c := testCatalog()
	res := Build(c, Node{ID: "spiffe://c.test/x"}, SVID{})
	var all *endpointv3.ClusterLoadAssignment
	for _, r := range res[resource.EndpointType] {
		if cla := r.(*endpointv3.ClusterLoadAssignment); cla.ClusterName == ClusterName("default", "echo", 8080, "") {
			all = cla
		}
	}
	if all == nil {
		t.Fatal("no load assignment for the whole service")
	}
	// The node is in c's zone us-1: its zone first, its region next, then
	// the failover order (west before east, against name order).
	want := []struct {
		site, zone string
		prio       uint32
		eps        int
	}{{"c", "us-1", 0, 1}, {"c", "us-2", 1, 1}, {"west", "ap-1", 2, 1}, {"east", "eu-1", 3, 2}}
	if len(all.Endpoints) != len(want) {
		t.Fatalf("got %d localities, want %d: %v", len(all.Endpoints), len(want), all.Endpoints)
	}
	for i, w := range want {
		got := all.Endpoints[i]
		if got.Locality.SubZone != w.site || got.Locality.Zone != w.zone || got.Priority != w.prio || len(got.LbEndpoints) != w.eps {
			t.Errorf("locality %d: got %s/%s priority %d with %d endpoints, want %+v", i, got.Locality.SubZone, got.Locality.Zone, got.Priority, len(got.LbEndpoints), w)
		}
	}
	// West's only endpoint is unhealthy: its gateway is marked, not dropped.
	if h := all.Endpoints[2].LbEndpoints[0].HealthStatus.String(); h != "UNHEALTHY" {
		t.Errorf("west's gateway endpoint is %s, want UNHEALTHY", h)
	}
	c.Down = map[string]bool{"east": true}
	res = Build(c, Node{ID: "spiffe://c.test/x"}, SVID{})
	for _, r := range res[resource.EndpointType] {
		cla := r.(*endpointv3.ClusterLoadAssignment)
		for _, l := range cla.Endpoints {
			if l.Locality.SubZone == "east" && l.LbEndpoints[0].HealthStatus.String() != "UNHEALTHY" {
				t.Errorf("%s: a site marked down still has healthy endpoints", cla.ClusterName)
			}
		}
	}
}

func TestAssignVIPsIsStableAndDistinct(t *testing.T) {
	p := netip.MustParsePrefix("127.200.0.0/30") // two usable addresses
	got := AssignVIPs(p, []string{"b/x", "a/y", "c/z"})
	if len(got) != 2 {
		t.Fatalf("got %d addresses from a /30, want 2: %v", len(got), got)
	}
	if got["a/y"] == got["b/x"] || !p.Contains(got["a/y"]) {
		t.Errorf("addresses collide or fall outside %s: %v", p, got)
	}
	again := AssignVIPs(p, []string{"a/y", "c/z", "b/x"})
	if again["a/y"] != got["a/y"] || again["b/x"] != got["b/x"] {
		t.Errorf("assignment depends on input order: %v vs %v", got, again)
	}
}

func TestGatewayRoutesOnlyLocalServices(t *testing.T) {
	c := testCatalog()
	c.Site = "east"
	res := Build(c, Node{ID: "spiffe://east.test/meshfed/node/gw", GatewayListen: "0.0.0.0:15443"}, SVID{CertPEM: []byte("c"), KeyPEM: []byte("k")})
	for typ, rs := range res {
		for _, r := range rs {
			if err := r.(validator).Validate(); err != nil {
				t.Errorf("%s: %v", typ, err)
			}
		}
	}
	ls := res[resource.ListenerType]
	if len(ls) != 1 {
		t.Fatalf("want one gateway listener, got %d", len(ls))
	}
	var names []string
	for _, fc := range ls[0].(*listenerv3.Listener).FilterChains {
		names = append(names, fc.FilterChainMatch.ServerNames...)
	}
	// East exports echo; the policy's split has no site, so both subsets
	// have a route; nothing of c or west does.
	want := []string{"8080.echo.default.east.fed.test", "canary.8080.echo.default.east.fed.test", "stable.8080.echo.default.east.fed.test"}
	if fmt.Sprint(names) != fmt.Sprint(want) {
		t.Errorf("routes %v, want %v", names, want)
	}
}

func ptr[T any](v T) *T { return &v }

// siteEndpoints are the addresses a node is given for site's endpoints in
// the whole service's load assignment.
func siteEndpoints(t *testing.T, c *Catalog, site string, n Node) []string {
	t.Helper()
	var out []string
	for _, r := range Build(c, n, SVID{})[resource.EndpointType] {
		cla := r.(*endpointv3.ClusterLoadAssignment)
		if err := cla.Validate(); err != nil {
			t.Error(err)
		}
		if cla.ClusterName != ClusterName("default", "echo", 8080, "") {
			continue
		}
		for _, l := range cla.Endpoints {
			if len(l.LbEndpoints) == 0 {
				t.Errorf("node %+v: locality %v has no endpoints", n, l.Locality)
			}
			for _, e := range l.LbEndpoints {
				if l.Locality.SubZone == site {
					out = append(out, e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
				}
			}
		}
	}
	return out
}

func TestIPOnlyNodesGetGatewayAddresses(t *testing.T) {
	c := testCatalog()
	if got := siteEndpoints(t, c, "east", Node{ID: "spiffe://c.test/x"}); fmt.Sprint(got) != "[10.0.0.1 gw.east.test]" {
		t.Errorf("a meshfed proxy gets %v, want the host name as it is", got)
	}
	// Envoy needs IP addresses: a host name not looked up yet is left out.
	envoy := Node{ID: "spiffe://c.test/x", IPOnly: true}
	if got := siteEndpoints(t, c, "east", envoy); fmt.Sprint(got) != "[10.0.0.1]" {
		t.Errorf("Envoy, before the lookup, gets %v", got)
	}
	c.Resolved = map[string][]netip.Addr{"gw.east.test": {netip.MustParseAddr("10.0.0.7"), netip.MustParseAddr("10.0.0.8")}}
	if got := siteEndpoints(t, c, "east", envoy); fmt.Sprint(got) != "[10.0.0.1 10.0.0.7 10.0.0.8]" {
		t.Errorf("Envoy gets %v, want the host name's addresses", got)
	}
	if hosts := hostNames(c); fmt.Sprint(hosts) != "[gw.east.test]" {
		t.Errorf("host names to look up: %v", hosts)
	}

	// A local endpoint known by host name (a container's, say) too.
	c.Services[0].Endpoints[0].Address = "echo-1.c.test"
	if hosts := hostNames(c); fmt.Sprint(hosts) != "[echo-1.c.test gw.east.test]" {
		t.Errorf("host names to look up: %v", hosts)
	}
	if got := siteEndpoints(t, c, "c", envoy); fmt.Sprint(got) != "[10.1.0.2]" {
		t.Errorf("Envoy, before the lookup, gets local endpoints %v", got)
	}
	c.Resolved["echo-1.c.test"] = []netip.Addr{netip.MustParseAddr("10.1.0.9")}
	if got := siteEndpoints(t, c, "c", envoy); fmt.Sprint(got) != "[10.1.0.9 10.1.0.2]" {
		t.Errorf("Envoy gets local endpoints %v", got)
	}
	if got := siteEndpoints(t, c, "c", Node{ID: "spiffe://c.test/x"}); fmt.Sprint(got) != "[echo-1.c.test 10.1.0.2]" {
		t.Errorf("a meshfed proxy gets local endpoints %v", got)
	}
}

// TestGRPCFailurePercentageOnlyWithAPolicy: gRPC counts every non-OK
// status against an endpoint, so its failure-percentage ejection stands in
// for consecutive failures only where a policy asks for outlier detection.
func TestGRPCFailurePercentageOnlyWithAPolicy(t *testing.T) {
	c := testCatalog()
	enforced := func(n Node) map[bool]int {
		out := map[bool]int{}
		for _, r := range Build(c, n, SVID{})[resource.ClusterType] {
			od := r.(*clusterv3.Cluster).GetOutlierDetection()
			on := od.GetEnforcingFailurePercentage().GetValue() == 100 && od.GetFailurePercentageMinimumHosts().GetValue() == 1 &&
				od.GetFailurePercentageRequestVolume().GetValue() == 3
			out[on]++
		}
		return out
	}
	grpcNode, proxyNode := Node{ID: "spiffe://c.test/ns/default/sa/client", GRPC: true}, Node{ID: "spiffe://c.test/ns/default/sa/client"}
	if got := enforced(grpcNode); got[true] != 0 {
		t.Errorf("no outlier detection in the policy: %d gRPC clusters eject by failure percentage", got[true])
	}
	pol := c.Policies["default/echo"]
	pol.OutlierDetection = &catalog.OutlierDetection{ConsecutiveFailures: 3}
	c.Policies["default/echo"] = pol
	if got := enforced(grpcNode); got[true] == 0 || got[false] != 0 {
		t.Errorf("policy with consecutiveFailures 3: gRPC clusters with failure-percentage ejection after 3 calls %d, without %d", got[true], got[false])
	}
	if got := enforced(proxyNode); got[true] != 0 {
		t.Errorf("a proxy's clusters eject by failure percentage too (%d); they count consecutive failures", got[true])
	}
}

// TestOutlierDetectionDefaultsFillThePolicy: a policy that sets one field
// of outlierDetection gets the defaults for the rest.
func TestOutlierDetectionDefaultsFillThePolicy(t *testing.T) {
	c := testCatalog()
	pol := c.Policies["default/echo"]
	pol.OutlierDetection = &catalog.OutlierDetection{MaxEjectionPercent: 50}
	c.Policies["default/echo"] = pol
	clusters := Build(c, Node{ID: "spiffe://c.test/ns/default/sa/client"}, SVID{})[resource.ClusterType]
	if len(clusters) == 0 {
		t.Fatal("no clusters")
	}
	for _, r := range clusters {
		od := r.(*clusterv3.Cluster).GetOutlierDetection()
		if od.GetConsecutiveLocalOriginFailure().GetValue() != DefaultConsecutiveFailures || od.GetInterval().AsDuration() != DefaultOutlierInterval ||
			od.GetBaseEjectionTime().AsDuration() != DefaultBaseEjectionTime || od.GetMaxEjectionPercent().GetValue() != 50 {
			t.Errorf("cluster %s: outlier detection %v; want the defaults with max ejection 50%%", r.(*clusterv3.Cluster).GetName(), od)
		}
	}
}
