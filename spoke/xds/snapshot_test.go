package xds

import (
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource(), ServiceName: name}}
}

// TestSnapshot_refusesWhatEnvoyWouldNot: a snapshot whose EDS clusters and
// endpoints do not match, or that holds a type a node does not get, is
// refused before it is set; a consistent one is versioned by type.
func TestSnapshot_refusesWhatEnvoyWouldNot(t *testing.T) {
	cla := func(name string) types.Resource { return &endpointv3.ClusterLoadAssignment{ClusterName: name} }
	for _, tc := range []struct {
		name string
		res  map[resource.Type][]types.Resource
		err  string
	}{
		{"an EDS cluster with its endpoints is set", map[resource.Type][]types.Resource{
			resource.ClusterType: {edsCluster("a")}, resource.EndpointType: {cla("a")}}, ""},
		{"an EDS cluster without its endpoints is refused", map[resource.Type][]types.Resource{
			resource.ClusterType: {edsCluster("a"), edsCluster("b")}, resource.EndpointType: {cla("a")}}, "mismatched"},
		{"endpoints no cluster names are refused", map[resource.Type][]types.Resource{
			resource.ClusterType: {edsCluster("a")}, resource.EndpointType: {cla("a"), cla("stray")}}, "mismatched"},
		{"a type a node does not get is refused", map[resource.Type][]types.Resource{
			resource.RuntimeType: {}}, "does not hold"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, versions, err := snapshot(tc.res)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("snapshot: %v; want an error saying %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := snap.GetVersion(resource.ClusterType); got == "" || got != versions[resource.ClusterType] || got == snap.GetVersion(resource.EndpointType) {
				t.Errorf("cluster version %q, endpoint version %q; want each type its own hash", got, snap.GetVersion(resource.EndpointType))
			}
		})
	}
}
