package xdsclient

import (
	xds "github.com/meshfed/meshfed/api/meshfed/xdsapi"
	"github.com/meshfed/meshfed/catalog"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/structpb"
)

// NewNode is what a node says of itself: its SPIFFE ID, its kind (agent:
// meshfed-proxy or meshfed-gateway), its locality (empty: its site's) and
// the meshfed.* metadata the spoke builds its configuration from.
func NewNode(id, agent string, loc catalog.Locality, md map[string]any) *xds.Node {
	st, err := structpb.NewStruct(md)
	if err != nil {
		panic(err) // strings and maps of strings only
	}
	n := &xds.Node{Id: id, UserAgentName: agent, Metadata: st}
	if loc != (catalog.Locality{}) {
		n.Locality = &xds.Locality{Region: loc.Region, Zone: loc.Zone}
	}
	return n
}

// Metrics are a Client's series.
type Metrics struct {
	Nacks   *prometheus.CounterVec
	Configs prometheus.Counter
}

// NewMetrics registers a Client's metrics on r.
func NewMetrics(r prometheus.Registerer) *Metrics {
	m := &Metrics{
		Nacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_xds_rejected_total",
			Help: "xDS responses or configurations the proxy refused, by type."}, []string{"type"}),
		Configs: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_configs_applied_total",
			Help: "Configurations from the spoke applied."}),
	}
	r.MustRegister(m.Nacks, m.Configs)
	return m
}
