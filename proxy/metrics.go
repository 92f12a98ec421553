package proxy

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	upstream       *prometheus.CounterVec
	downstream     *prometheus.CounterVec
	inbound        *prometheus.CounterVec
	gateway        *prometheus.CounterVec
	gatewayLive    prometheus.Gauge
	loops          prometheus.Gauge
	acceptPaused   prometheus.Counter
	fdWaits        prometheus.Counter
	active         *prometheus.GaugeVec
	ejections      *prometheus.CounterVec
	nacks          *prometheus.CounterVec
	configs        prometheus.Counter
	listenerErrors prometheus.Counter
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_upstream_connections_total",
			Help: "Connection attempts to upstream endpoints by cluster, site, zone and result (success, connect_failure)."}, []string{"cluster", "site", "zone", "result"}),
		downstream: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_outbound_connections_total",
			Help: "App connections to outbound listeners by listener and result (ok, upstream_failure, no_cluster, out_of_descriptors)."}, []string{"listener", "result"}),
		inbound: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_inbound_connections_total",
			Help: "Connections to inbound listeners by listener and result (ok, denied, tls_failure, app_unreachable)."}, []string{"listener", "result"}),
		gateway: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_gateway_connections_total",
			Help: "Connections to a gateway listener by result: ok, or why refused (unknown_sni, no_sni, not_tls, malformed, oversized, hello_timeout, no_endpoint, upstream_failure, out_of_descriptors)."}, []string{"result"}),
		acceptPaused: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_gateway_accept_paused_total",
			Help: "Times a gateway listener stopped accepting for a moment because the process was out of file descriptors; callers wait in the kernel's queue meanwhile."}),
		fdWaits: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_upstream_descriptor_waits_total",
			Help: "Times a caller (of an outbound listener or the gateway) waited 100ms for a file descriptor to connect upstream with; once the cluster's connect timeout has passed it is refused as out_of_descriptors."}),
		gatewayLive: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_gateway_active_connections",
			Help: "Connections a gateway listener holds now, from accept (hello included) to close."}),
		loops: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_proxy_event_loops",
			Help: "Event loops running (Linux): a gateway listener's, and those relaying connections past their TLS handshake; each is one thread, at most --concurrency of each kind."}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshfed_proxy_upstream_active_connections",
			Help: "Live outbound connections by cluster."}, []string{"cluster"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_outlier_ejections_total",
			Help: "Endpoints ejected by outlier detection, by cluster, site and zone."}, []string{"cluster", "site", "zone"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_xds_rejected_total",
			Help: "xDS responses or configurations the proxy refused, by type."}, []string{"type"}),
		configs: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_configs_applied_total",
			Help: "Configurations from the spoke applied."}),
		listenerErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_listener_errors_total",
			Help: "Listeners that could not be opened."}),
	}
	r.MustRegister(m.upstream, m.downstream, m.inbound, m.gateway, m.gatewayLive, m.loops, m.acceptPaused, m.fdWaits, m.active, m.ejections, m.nacks, m.configs, m.listenerErrors)
	return m
}
