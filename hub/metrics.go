package hub

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	spokesConnected   prometheus.Gauge
	sites             prometheus.Gauge
	services          prometheus.Gauge
	endpoints         prometheus.Gauge
	pushDuration      prometheus.Histogram
	initialSync       *prometheus.GaugeVec
	nacks             *prometheus.CounterVec
	resourcesSent     *prometheus.CounterVec
	resourcesReceived *prometheus.CounterVec
	joins             *prometheus.CounterVec
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		spokesConnected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_hub_spokes_connected", Help: "Spokes with a live federation stream."}),
		sites:           prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_hub_sites", Help: "Registered sites."}),
		services:        prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_hub_catalog_services", Help: "Services in the federated catalog, counted once per site that exports them."}),
		endpoints:       prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_hub_catalog_endpoints", Help: "Endpoints in the federated catalog."}),
		pushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshfed_hub_push_duration_seconds",
			Help:    "Time from a catalog change at the hub to the ACK of the spoke it was pushed to, for changes made while the spoke was connected (the initial sync is meshfed_hub_initial_sync_seconds).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		initialSync: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshfed_hub_initial_sync_seconds",
			Help: "How long a site's last initial sync took: from its stream's start to the ACK of the last delta with what changed before it connected."}, []string{"site"}),
		nacks:             prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_hub_nacks_total", Help: "Deltas refused, by who refused them: the spoke (of the hub's push) or the hub (of a spoke's)."}, []string{"site", "by"}),
		resourcesSent:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_hub_resources_sent_total", Help: "Resources pushed to a spoke and ACKed."}, []string{"site"}),
		resourcesReceived: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_hub_resources_received_total", Help: "Resources received from a spoke and stored."}, []string{"site"}),
		joins:             prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_hub_joins_total", Help: "Join token redemptions by result."}, []string{"result"}),
	}
	r.MustRegister(m.spokesConnected, m.sites, m.services, m.endpoints, m.pushDuration, m.initialSync, m.nacks, m.resourcesSent, m.resourcesReceived, m.joins)
	return m
}
