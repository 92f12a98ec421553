package upstream

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the series a Set keeps; NewMetrics registers them.
type Metrics struct {
	Attempts  *prometheus.CounterVec
	FDWaits   prometheus.Counter
	Ejections *prometheus.CounterVec
}

// NewMetrics registers a Set's metrics on r.
func NewMetrics(r prometheus.Registerer) *Metrics {
	m := &Metrics{
		Attempts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_upstream_connections_total",
			Help: "Connection attempts to upstream endpoints by cluster, site, zone and result (success, connect_failure)."}, []string{"cluster", "site", "zone", "result"}),
		FDWaits: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_proxy_upstream_descriptor_waits_total",
			Help: "Times a caller (of an outbound listener or the gateway) waited 100ms for a file descriptor to connect upstream with; once the cluster's connect timeout has passed it is refused as out_of_descriptors."}),
		Ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshfed_proxy_outlier_ejections_total",
			Help: "Endpoints ejected by outlier detection, by cluster, site and zone."}, []string{"cluster", "site", "zone"}),
	}
	r.MustRegister(m.Attempts, m.FDWaits, m.Ejections)
	return m
}

// Set is a node's clusters by name. A cluster's state survives
// configuration pushes for as long as the cluster is in them.
type Set struct {
	log *slog.Logger
	m   *Metrics

	mu        sync.Mutex
	upstreams map[string]*Upstream
}

// NewSet returns an empty set that counts into m and logs ejections to log.
func NewSet(m *Metrics, log *slog.Logger) *Set {
	return &Set{log: log, m: m, upstreams: map[string]*Upstream{}}
}

// Apply takes a configuration's clusters: new ones start fresh, known ones
// keep their endpoints' state, others are dropped.
func (s *Set) Apply(clusters map[string]*xdsclient.Cluster) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, cc := range clusters {
		u := s.upstreams[name]
		if u == nil {
			u = &Upstream{hosts: map[string]*hostState{}, ejected: s.onEject}
			s.upstreams[name] = u
		}
		u.setConf(cc)
	}
	for name := range s.upstreams {
		if clusters[name] == nil {
			delete(s.upstreams, name)
		}
	}
}

// Get is the named cluster's state; nil when the configuration has none.
func (s *Set) Get(cluster string) *Upstream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.upstreams[cluster]
}

func (s *Set) onEject(c *xdsclient.Cluster, e xdsclient.Endpoint) {
	s.m.Ejections.WithLabelValues(c.Name, e.Site, e.Zone).Inc()
	s.log.Warn("endpoint ejected after consecutive connect failures", "cluster", c.Name, "endpoint", e.Addr, "site", e.Site)
}

// Attempted records how a connection attempt to e ended, for outlier
// detection and the metrics.
func (s *Set) Attempted(cluster string, u *Upstream, e xdsclient.Endpoint, err error) {
	u.result(e, err == nil, time.Now())
	if err != nil {
		s.m.Attempts.WithLabelValues(cluster, e.Site, e.Zone, "connect_failure").Inc()
		s.log.Debug("upstream connect failed", "cluster", cluster, "endpoint", e.Addr, "err", err)
		return
	}
	s.m.Attempts.WithLabelValues(cluster, e.Site, e.Zone, "success").Inc()
}

// WaitedForDescriptor counts one pause for want of a file descriptor.
func (s *Set) WaitedForDescriptor() { s.m.FDWaits.Inc() }

// Dialer connects to one endpoint of a cluster (and completes TLS if the
// cluster asks for it).
type Dialer func(c *xdsclient.Cluster, e xdsclient.Endpoint) (net.Conn, error)

// Connect opens a connection to one of cluster's endpoints with dial,
// trying the next endpoint when a connection or handshake fails, up to
// attempts. Without a connection, it says why (a metric's result).
func (s *Set) Connect(cluster string, attempts int, dial Dialer) (net.Conn, string) {
	u := s.Get(cluster)
	if u == nil {
		return nil, "no_cluster"
	}
	var tried Tried
	var fdWait time.Time
	for attempt := 0; attempt < max(attempts, 1); attempt++ {
		e, ok := u.Pick(tried, time.Now())
		if !ok {
			break
		}
		tried.Add(Key(e))
		up, err := dial(u.Config(), e)
		if OutOfDescriptors(err) {
			// Not the endpoint's fault: wait for a descriptor, as long as
			// a connect may take.
			if fdWait.IsZero() {
				fdWait = time.Now().Add(u.Config().ConnectTimeout)
			}
			pause := min(DescriptorPause, time.Until(fdWait))
			if pause <= 0 {
				return nil, "out_of_descriptors"
			}
			s.WaitedForDescriptor()
			time.Sleep(pause)
			tried.Remove(Key(e))
			attempt--
			continue
		}
		s.Attempted(cluster, u, e, err)
		if err == nil {
			return up, ""
		}
	}
	return nil, Unconnected(tried)
}

// Unconnected says why attempts at the endpoints in tried gave no
// connection.
func Unconnected(tried Tried) string {
	if len(tried) == 0 {
		return "no_endpoint"
	}
	return "upstream_failure"
}

// DescriptorPause is how long the process waits before the next try when
// it is out of file descriptors: a gateway loop's accepting pauses (callers
// wait in the kernel's queue, as HAProxy has them), and a caller already
// accepted, by a gateway or an outbound listener, waits to connect
// upstream. (A proxy listener's accept loop backs off on its own.)
const DescriptorPause = 100 * time.Millisecond

// OutOfDescriptors: err is this process's (or the system's) lack of file
// descriptors or memory, not a peer's doing.
func OutOfDescriptors(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}
