package harness

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/prometheus/client_golang/prometheus"
)

// EDSWatch is a node of a site reading its EDS as a proxy there would: it
// records when each cluster first has a healthy endpoint of a site.
type EDSWatch struct {
	site    string
	mu      sync.Mutex
	healthy map[string]time.Time // cluster name → when
	changed chan struct{}
}

// WatchEDS attests node at s's spoke and follows its xDS configuration
// until the test ends, noting endpoints of site.
func WatchEDS(t testing.TB, s *Site, node, site string) *EDSWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	id, err := identityclient.New(ctx, identityclient.Options{Addr: s.Identity, Token: s.CLI(t, "vm", "token", "create", "--site", s.Name, "--node", node)})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := xdsclient.Dial(s.XDS, id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	w := &EDSWatch{site: site, healthy: map[string]time.Time{}, changed: make(chan struct{}, 1)}
	xc := &xdsclient.Client{Conn: conn, Update: w.update, Metrics: xdsclient.NewMetrics(prometheus.NewRegistry()),
		Node: xdsclient.NewNode(id.SVID().ID.String(), "meshfed-proxy", catalog.Locality{}, map[string]any{}), Secrets: []string{"default", "federation"}}
	done := make(chan struct{})
	go func() { defer close(done); _ = xc.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

func (w *EDSWatch) update(cfg *xdsclient.Config) error {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	for name, c := range cfg.Clusters {
		if _, seen := w.healthy[name]; seen {
			continue
		}
		for _, prio := range c.Priorities {
			if slices.ContainsFunc(prio, func(e xdsclient.Endpoint) bool { return e.Healthy && e.Site == w.site }) {
				w.healthy[name] = now
			}
		}
	}
	select {
	case w.changed <- struct{}{}:
	default:
	}
	return nil
}

// Healthy waits until cluster has a healthy endpoint of the site and says
// when it first had.
func (w *EDSWatch) Healthy(cluster string, within time.Duration) (time.Time, error) {
	deadline := time.After(within)
	for {
		w.mu.Lock()
		at, ok := w.healthy[cluster]
		w.mu.Unlock()
		if ok {
			return at, nil
		}
		select {
		case <-w.changed:
		case <-deadline:
			return time.Time{}, fmt.Errorf("%s has no healthy endpoint of %s in the EDS after %v", cluster, w.site, within)
		}
	}
}
