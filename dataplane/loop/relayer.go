package loop

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// RelayOptions configures a Relayer.
type RelayOptions struct {
	// Loops bounds how many relay loops run (one thread each). Required.
	Loops int
	// Tracker counts relayed connections live, for the node's drain.
	// Required.
	Tracker *Tracker
	// Gauge counts running loops (meshfed_proxy_event_loops). Required.
	Gauge  prometheus.Gauge
	Logger *slog.Logger
}

// NewRelayer returns a relayer whose loops start with the first
// connections.
func NewRelayer(o RelayOptions) *Relayer { return &Relayer{o: o} }

// NewLoopsGauge registers the gauge of running event loops on r, which a
// node's relay and routing loops share.
func NewLoopsGauge(r prometheus.Registerer) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_proxy_event_loops",
		Help: "Event loops running (Linux): a gateway listener's, and those relaying connections past their TLS handshake; each is one thread, at most --concurrency of each kind."})
	r.MustRegister(g)
	return g
}

// NewListenerErrors registers the counter of listeners a node could not
// open on r, which the proxy and the gateway share.
func NewListenerErrors(r prometheus.Registerer) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_listener_errors_total",
		Help: "Listeners that could not be opened."})
	r.MustRegister(c)
	return c
}
