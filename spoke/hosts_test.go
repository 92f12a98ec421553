package spoke

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func testHosts(t *testing.T, dir string) (*hosts, *Local) {
	t.Helper()
	return testHostsRemoved(t, dir, map[string]time.Time{})
}

// testHostsRemoved has the hosts in removed removed from the site then.
func testHostsRemoved(t *testing.T, dir string, removed map[string]time.Time) (*hosts, *Local) {
	t.Helper()
	o := DefaultOptions()
	o.DataDir = dir
	l := NewLocal("dc1")
	l.td = spiffeid.RequireTrustDomainFromString("dc1.test")
	h, err := openHosts(o, l, func(node string) (time.Time, bool) { at, ok := removed[node]; return at, ok }, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	return h, l
}

func healths(l *Local) []string {
	var out []string
	for _, s := range l.Services() {
		for _, e := range s.Endpoints {
			out = append(out, e.Address+"="+e.Health+"@"+e.Labels[catalog.LabelNode])
		}
	}
	return out
}

// A host's report is labelled with the calling node whatever it says; a
// silent host goes unhealthy, then leaves; a restarted spoke starts from
// the kept reports.
func TestHostsReportStaleExpireAndRestart(t *testing.T) {
	dir := t.TempDir()
	h, l := testHosts(t, dir)
	svc := catalog.Service{Namespace: "default", Name: "echo", Endpoints: []catalog.Endpoint{
		{Address: "172.18.0.2", Port: 8080, Health: catalog.HealthHealthy, Labels: map[string]string{catalog.LabelNode: "someone-else"}},
	}}
	if err := h.report("host-7", time.Now(), &meshfedv1.HostReport{AgentVersion: "v1", Services: []*meshfedv1.Service{federation.ServiceToWire("", svc)}}); err != nil {
		t.Fatal(err)
	}
	if got, want := healths(l), "[172.18.0.2=healthy@host-7]"; fmtS(got) != want {
		t.Fatalf("after the report: %v, want %s", got, want)
	}
	bad := catalog.Service{Namespace: "default", Name: "echo", Endpoints: []catalog.Endpoint{{Address: "172.18.0.3", Port: 8080, Identity: "spiffe://other.test/ns/default/sa/echo"}}}
	if err := h.report("host-7", time.Now(), &meshfedv1.HostReport{Services: []*meshfedv1.Service{federation.ServiceToWire("", bad)}}); err == nil {
		t.Fatal("a report with an identity of another trust domain was taken")
	}
	if got, want := healths(l), "[172.18.0.2=healthy@host-7]"; fmtS(got) != want {
		t.Fatalf("a refused report changed the catalog: %v, want %s", got, want)
	}

	// A spoke started on the same data dir has the host at once.
	_, l2 := testHosts(t, dir)
	if got, want := healths(l2), "[172.18.0.2=healthy@host-7]"; fmtS(got) != want {
		t.Fatalf("after a spoke restart: %v, want %s", got, want)
	}

	now := time.Now()
	h.sweep(now.Add(h.staleAfter + time.Second))
	if got, want := healths(l), "[172.18.0.2=unhealthy@host-7]"; fmtS(got) != want {
		t.Fatalf("a silent host: %v, want %s", got, want)
	}
	if st, _ := l.table.Get(federation.SourceStatusKey("dc1")); len(st.GetSourceStatus().GetHosts()) != 1 || !st.GetSourceStatus().GetHosts()[0].GetStale() {
		t.Fatalf("the site status does not show host-7 stale: %v", st.GetSourceStatus())
	}
	h.sweep(now.Add(h.expireAfter + time.Second))
	if got := healths(l); len(got) != 0 {
		t.Fatalf("an expired host's endpoints stay: %v", got)
	}
}

func fmtS(s []string) string { return fmt.Sprint(s) }

// A removed host leaves at once; the same name brought back with a new
// credential (issued after the removal) stays.
func TestHostsRemoved(t *testing.T) {
	removed := map[string]time.Time{}
	h, l := testHostsRemoved(t, t.TempDir(), removed)
	svc := catalog.Service{Namespace: "default", Name: "echo", Endpoints: []catalog.Endpoint{{Address: "172.18.0.2", Port: 8080}}}
	report := &meshfedv1.HostReport{Services: []*meshfedv1.Service{federation.ServiceToWire("", svc)}}
	issued := time.Now().Add(-time.Minute)
	if err := h.report("host-7", issued, report); err != nil {
		t.Fatal(err)
	}
	h.sweep(time.Now())
	if got := healths(l); len(got) != 1 {
		t.Fatalf("before the removal: %v", got)
	}
	removed["host-7"] = issued.Add(time.Second)
	h.sweep(time.Now())
	if got := healths(l); len(got) != 0 {
		t.Fatalf("a removed host's endpoints stay: %v", got)
	}
	if err := h.report("host-7", issued.Add(2*time.Second), report); err != nil {
		t.Fatal(err)
	}
	h.sweep(time.Now())
	if got := healths(l); len(got) != 1 {
		t.Fatalf("a host that joined again after its removal was dropped: %v", got)
	}
}
