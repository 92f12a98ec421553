package vmagent

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	containers   prometheus.GaugeFunc
	endpoints    *prometheus.GaugeVec
	dockerErrors prometheus.Counter
	staticErrors prometheus.Counter
	eventsLag    prometheus.Histogram
	reports      *prometheus.CounterVec
}

func newMetrics(r prometheus.Registerer, a *Agent) *metrics {
	m := &metrics{
		containers: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_vmagent_containers", Help: "Containers the agent sees on the host, labelled or not."},
			func() float64 { a.mu.Lock(); defer a.mu.Unlock(); return float64(len(a.containers)) }),
		endpoints:    prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshfed_vmagent_endpoints", Help: "Endpoints the agent reports, by health."}, []string{"health"}),
		dockerErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_vmagent_docker_errors_total", Help: "Docker Engine API calls or event streams that failed."}),
		staticErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_vmagent_static_errors_total", Help: "Reloads of the static services file refused (the last valid content stays)."}),
		eventsLag: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshfed_vmagent_events_lag_seconds", Help: "From a Docker event to the agent having handled it.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_vmagent_reports_total", Help: "Reports of the host's state to the spoke, by result (ok, failed)."}, []string{"result"}),
	}
	r.MustRegister(m.containers, m.endpoints, m.dockerErrors, m.staticErrors, m.eventsLag, m.reports)
	return m
}
