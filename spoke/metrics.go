package spoke

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	hubConnected       prometheus.Gauge
	syncs              prometheus.Counter
	federatedServices  prometheus.GaugeFunc
	federatedEndpoints prometheus.GaugeFunc
	localServices      prometheus.GaugeFunc
	resourcesReceived  *prometheus.CounterVec
	resourcesSent      prometheus.Counter
	nacks              *prometheus.CounterVec
	sourceErrors       prometheus.Counter
	lastContact        prometheus.GaugeFunc
	expired            prometheus.Counter
	svids              *prometheus.CounterVec
	gossipSiteAlive    *prometheus.GaugeVec
}

func newMetrics(r prometheus.Registerer, s *Spoke) *metrics {
	m := &metrics{
		gossipSiteAlive: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshfed_spoke_gossip_site_alive",
			Help: "1 while a site has a live gateway in the WAN gossip pool, 0 once none is (its endpoints are then unhealthy in this site's EDS)."}, []string{"site"}),
		hubConnected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_spoke_hub_connected", Help: "1 while the federation stream to the hub is up."}),
		syncs:        prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_spoke_syncs_total", Help: "Federation streams established with the hub."}),
		federatedServices: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_spoke_federated_services", Help: "Other sites' services in this spoke's view."},
			func() float64 { return float64(len(s.view.table.Versions("svc/"))) }),
		federatedEndpoints: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_spoke_federated_endpoints", Help: "Other sites' endpoints in this spoke's view."},
			func() float64 { return float64(countEndpoints(s.view.table.List("svc/"))) }),
		localServices: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_spoke_local_services", Help: "This site's own exported services."},
			func() float64 { return float64(len(s.local.table.Versions("svc/"))) }),
		resourcesReceived: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_spoke_resources_received_total", Help: "Resources received from the hub (updates and removals), by kind: service or site."}, []string{"kind"}),
		resourcesSent:     prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_spoke_resources_sent_total", Help: "Resources sent to the hub and ACKed."}),
		nacks:             prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_spoke_nacks_total", Help: "Deltas refused, by who refused them."}, []string{"by"}),
		sourceErrors:      prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_spoke_source_errors_total", Help: "Invalid inputs from the local source (kept out of the catalog)."}),
		lastContact: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_spoke_last_hub_contact_timestamp_seconds", Help: "When the hub was last heard from."},
			func() float64 { return float64(s.view.LastContact().UnixNano()) / 1e9 }),
		expired: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_spoke_view_expired_services_total", Help: "Remote services dropped because the hub was unreachable past --max-stale."}),
	}
	m.svids = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_spoke_svids_total", Help: "SVID requests by how (attest, renew) and result (issued, refused)."}, []string{"how", "result"})
	r.MustRegister(m.gossipSiteAlive, m.svids)
	r.MustRegister(m.hubConnected, m.syncs, m.federatedServices, m.federatedEndpoints, m.localServices, m.resourcesReceived, m.resourcesSent, m.nacks, m.sourceErrors, m.lastContact, m.expired)
	return m
}
