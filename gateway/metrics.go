package gateway

import (
	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the gateway's own series; the engine's (upstream attempts,
// xDS, event loops) are registered by the dataplane packages.
type metrics struct {
	results        *prometheus.CounterVec
	live           prometheus.Gauge
	acceptPaused   prometheus.Counter
	listenerErrors prometheus.Counter
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_gateway_connections_total",
			Help: "Connections to a gateway listener by result: ok, or why refused (unknown_sni, no_sni, not_tls, malformed, oversized, hello_timeout, no_endpoint, upstream_failure, out_of_descriptors)."}, []string{"result"}),
		live: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_gateway_active_connections",
			Help: "Connections a gateway listener holds now, from accept (hello included) to close."}),
		acceptPaused: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_gateway_accept_paused_total",
			Help: "Times a gateway listener stopped accepting for a moment because the process was out of file descriptors; callers wait in the kernel's queue meanwhile."}),
	}
	r.MustRegister(m.results, m.live, m.acceptPaused)
	m.listenerErrors = loop.NewListenerErrors(r)
	return m
}
