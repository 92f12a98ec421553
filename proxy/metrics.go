package proxy

import (
	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the proxy's own series; the engine's (upstream attempts,
// ejections, xDS, event loops) are registered by the dataplane packages.
type metrics struct {
	downstream     *prometheus.CounterVec
	inbound        *prometheus.CounterVec
	active         *prometheus.GaugeVec
	listenerErrors prometheus.Counter
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		downstream: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_outbound_connections_total",
			Help: "App connections to outbound listeners by listener and result (ok, upstream_failure, no_cluster, out_of_descriptors)."}, []string{"listener", "result"}),
		inbound: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_inbound_connections_total",
			Help: "Connections to inbound listeners by listener and result (ok, denied, tls_failure, app_unreachable)."}, []string{"listener", "result"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshfed_proxy_upstream_active_connections",
			Help: "Live outbound connections by cluster."}, []string{"cluster"}),
	}
	r.MustRegister(m.downstream, m.inbound, m.active)
	m.listenerErrors = loop.NewListenerErrors(r)
	return m
}
