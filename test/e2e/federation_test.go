package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
)

func TestMain(m *testing.M) {
	// grpc-go reads its experimental xDS switches once, as it starts: the
	// proxyless tests need SNI from endpoint host names (gRFC A101) and
	// SPIFFE bundle maps (A87), so the tests run again with them set, as a
	// user's gRPC program is started (docs/dataplane.md).
	if os.Getenv("GRPC_EXPERIMENTAL_XDS_SNI") == "" {
		self, err := os.Executable()
		if err == nil {
			err = syscall.Exec(self, os.Args, append(os.Environ(), "GRPC_EXPERIMENTAL_XDS_SNI=true", "GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true"))
		}
		fmt.Fprintln(os.Stderr, "run the tests again with gRPC's xDS switches:", err)
		os.Exit(2)
	}
	os.Exit(harness.Main(m))
}

// federation is a hub and its spokes, run as processes of the built binary.
type federation struct {
	t         *testing.T
	bin       string
	dir       string
	hubAddr   string
	hubHTTP   string
	bundles   string
	storeArgs []string
	hub       *harness.Process
	spokes    map[string]*spokeProc
	// gateways are sites' gateway addresses, set before addSite; kinds
	// their kinds, when not docker.
	gateways map[string]string
	kinds    map[string]string
}

type spokeProc struct {
	site, dir, file, http, identity, xds string
	args                                 []string
	p                                    *harness.Process
}

func newFederation(t *testing.T, storeArgs ...string) *federation {
	f := &federation{t: t, bin: harness.Binary(t), dir: t.TempDir(), hubAddr: harness.FreePort(t), hubHTTP: harness.FreePort(t), bundles: harness.FreePort(t), storeArgs: storeArgs, spokes: map[string]*spokeProc{}, gateways: map[string]string{}, kinds: map[string]string{}}
	f.startHub()
	return f
}

func (f *federation) startHub() {
	f.t.Helper()
	args := append([]string{"hub", "--data-dir", filepath.Join(f.dir, "hub"), "--listen", f.hubAddr, "--http-listen", f.hubHTTP, "--bundle-listen", f.bundles, "--federation", "test.meshfed"}, f.storeArgs...)
	f.hub = harness.Start(f.t, "hub", f.bin, args...)
	harness.WaitReady(f.t, f.hubHTTP, 30*time.Second)
}

func (f *federation) cli(args ...string) (string, error) {
	return harness.Run(f.bin, append([]string{"--config", filepath.Join(f.dir, "hub", "admin.conf")}, args...)...)
}

func (f *federation) mustCLI(args ...string) string {
	f.t.Helper()
	out, err := f.cli(args...)
	if err != nil {
		f.t.Fatal(err)
	}
	return out
}

// addSite registers site, writes its services file and starts its spoke
// (with extra spoke flags). zone may be "region/zone" (region "test"
// otherwise); the gateway address is f.gateways[site] if set.
func (f *federation) addSite(site, zone string, services string, extra ...string) *spokeProc {
	f.t.Helper()
	// A gateway address is site data here: a name under the reserved .test
	// domain, never resolved or dialed by these tests.
	region := "test"
	if r, z, ok := strings.Cut(zone, "/"); ok {
		region, zone = r, z
	}
	gw := f.gateways[site]
	if gw == "" {
		gw = "gw-" + site + ".meshfed.test:15443"
	}
	kind := f.kinds[site]
	if kind == "" {
		kind = "docker"
	}
	f.mustCLI("site", "add", site, "--kind", kind, "--region", region, "--zone", zone, "--gateway-address", gw)
	token := strings.TrimSpace(f.mustCLI("site", "token", "create", "--site", site, "--ttl", "10m"))
	s := &spokeProc{site: site, dir: filepath.Join(f.dir, site), file: filepath.Join(f.dir, site+".yaml"), http: harness.FreePort(f.t), identity: harness.FreePort(f.t), xds: harness.FreePort(f.t)}
	args := []string{"spoke", "--site", site, "--hub", f.hubAddr, "--token", token,
		"--data-dir", s.dir, "--http-listen", s.http, "--identity-listen", s.identity, "--xds-listen", s.xds}
	if services != "" { // "" is a site whose services come from elsewhere (its cluster)
		writeFile(f.t, s.file, services)
		args = append(args, "--services", s.file, "--services-poll", "50ms")
	}
	args = append(args, extra...)
	s.args = args
	s.p = harness.Start(f.t, "spoke-"+site, f.bin, args...)
	f.spokes[site] = s
	return s
}

// restartSpoke kills s's spoke and starts it again with its data dir.
func (f *federation) restartSpoke(s *spokeProc) {
	f.t.Helper()
	s.p.Kill()
	s.p = harness.Start(f.t, "spoke-"+s.site, f.bin, s.args...)
	harness.WaitReady(f.t, s.http, 20*time.Second)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// entries renders a catalog as sorted "site:ns/name:endpoints:labels" lines.
func entries(services []catalog.Service) string {
	var out []string
	for _, s := range services {
		var eps []string
		for _, e := range s.Endpoints {
			eps = append(eps, fmt.Sprintf("%s:%d%v", e.Address, e.Port, e.Labels))
		}
		sort.Strings(eps)
		out = append(out, s.Site+":"+s.ID()+":"+strings.Join(eps, ","))
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// catalogVia is the federated catalog as a hub's CLI shows it.
func catalogVia(cli func(args ...string) (string, error)) (string, error) {
	out, err := cli("service", "list", "-o", "json")
	if err != nil {
		return "", err
	}
	var sums []struct {
		Namespace, Name string
		Sites           []string
	}
	if err := json.Unmarshal([]byte(out), &sums); err != nil {
		return "", err
	}
	var all []catalog.Service
	for _, s := range sums {
		out, err := cli("service", "show", s.Namespace+"/"+s.Name, "-o", "json")
		if err != nil {
			return "", err
		}
		var svcs []catalog.Service
		if err := json.Unmarshal([]byte(out), &svcs); err != nil {
			return "", err
		}
		all = append(all, svcs...)
	}
	return entries(all), nil
}

// converged waits until the hub and every spoke see exactly want.
func (f *federation) converged(within time.Duration, want string) {
	f.t.Helper()
	catalogIs(f.t, within, "the hub", f.cli, want)
	for _, s := range f.spokes {
		viewIs(f.t, within, s, want)
	}
}

// catalogIs waits until the catalog a hub's CLI shows is exactly want.
func catalogIs(t *testing.T, within time.Duration, hub string, cli func(...string) (string, error), want string) {
	t.Helper()
	harness.Eventually(t, within, hub+" has the whole catalog", func() error {
		got, err := catalogVia(cli)
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("catalog of %s:\n%s\nwant:\n%s", hub, got, want)
		}
		return nil
	})
}

// viewIs waits until spoke s's view of the federation is exactly want.
func viewIs(t *testing.T, within time.Duration, s *spokeProc, want string) {
	t.Helper()
	harness.Eventually(t, within, "spoke "+s.site+" sees every site's services", func() error {
		v, err := harness.View(s.http)
		if err != nil {
			return err
		}
		if got := entries(v.Services); got != want {
			return fmt.Errorf("view of %s:\n%s\nwant:\n%s", s.site, got, want)
		}
		return nil
	})
}

func servicesYAML(rev int, extra string) string {
	return fmt.Sprintf(`services:
- namespace: default
  name: echo
  ports: [{name: http, port: 8080}]
  endpoints:
  - {address: 127.0.0.11, port: 18080, labels: {rev: "%d"}}
  - {address: 127.0.0.12, port: 18080}
%s`, rev, extra)
}

const (
	siteB = `services:
- namespace: default
  name: echo
  endpoints:
  - {address: 127.0.0.21, port: 18080}
- namespace: shop
  name: bravo
  endpoints:
  - {address: 127.0.0.22, port: 9000}
`
	siteC = `services:
- namespace: shop
  name: charlie
  endpoints:
  - {address: 127.0.0.31, port: 9000, health: unhealthy}
`
)

func wantCatalog(rev int) string {
	return strings.Join([]string{
		fmt.Sprintf("a:default/echo:127.0.0.11:18080map[rev:%d],127.0.0.12:18080map[]", rev),
		"a:team-a/alpha:127.0.0.13:7000map[]",
		"b:default/echo:127.0.0.21:18080map[]",
		"b:shop/bravo:127.0.0.22:9000map[]",
		"c:shop/charlie:127.0.0.31:9000map[]",
	}, "\n")
}

const alpha = `- namespace: team-a
  name: alpha
  endpoints:
  - {address: 127.0.0.13, port: 7000}
`

func TestFederation_bolt(t *testing.T) { testFederation(t) }

func TestFederation_etcd(t *testing.T) {
	url := harness.Etcd(t)
	testFederation(t, "--store", "etcd", "--etcd-endpoints", url, "--etcd-prefix", "/e2e/")
}

func testFederation(t *testing.T, storeArgs ...string) {
	f := newFederation(t, storeArgs...)
	a := f.addSite("a", "z1", servicesYAML(0, alpha))
	f.addSite("b", "z2", siteB)
	f.addSite("c", "z3", siteC)

	t.Run("every spoke sees the other sites' services", func(t *testing.T) {
		f.converged(30*time.Second, wantCatalog(0))
	})

	t.Run("a hub killed mid-write loses nothing", func(t *testing.T) {
		var rev atomic.Int64
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				case <-time.After(15 * time.Millisecond):
				}
				writeFile(t, a.file, servicesYAML(int(rev.Add(1)), alpha))
			}
		}()
		harness.Eventually(t, 10*time.Second, "writes reach the hub", func() error {
			n, err := harness.Metric(f.hubHTTP, "meshfed_hub_resources_received_total", `site="a"`)
			if err != nil || n < 10 {
				return fmt.Errorf("hub received %v resources from a (%v)", n, err)
			}
			return nil
		})
		f.hub.Kill()
		time.Sleep(100 * time.Millisecond) // let writes pile up while the hub is down
		f.startHub()
		harness.Eventually(t, 10*time.Second, "writes reach the restarted hub", func() error {
			n, err := harness.Metric(f.hubHTTP, "meshfed_hub_resources_received_total", `site="a"`)
			if err != nil || n < 5 {
				return fmt.Errorf("hub received %v resources from a (%v)", n, err)
			}
			return nil
		})
		close(stop)
		<-done
		f.converged(30*time.Second, wantCatalog(int(rev.Load())))
	})

	t.Run("spokes resume after a hub restart without a full resend", func(t *testing.T) {
		before := map[string][2]float64{}
		for _, s := range f.spokes {
			recv, err1 := harness.Metric(s.http, "meshfed_spoke_resources_received_total", `kind="service"`)
			syncs, err2 := harness.Metric(s.http, "meshfed_spoke_syncs_total")
			if err1 != nil || err2 != nil {
				t.Fatal(err1, err2)
			}
			before[s.site] = [2]float64{recv, syncs}
		}
		f.hub.Kill()
		for _, s := range f.spokes {
			v, err := harness.View(s.http)
			if err != nil {
				t.Fatalf("spoke %s with the hub down: %v", s.site, err)
			}
			if got, want := entries(v.Services), wantCatalog(currentRev(t, a.file)); got != want {
				t.Errorf("spoke %s with the hub down serves:\n%s\nwant its last view:\n%s", s.site, got, want)
			}
			if _, err := harness.GetText("http://" + s.http + "/readyz"); err != nil {
				t.Errorf("spoke %s is not ready with the hub down: %v", s.site, err)
			}
		}
		f.startHub()
		for _, s := range f.spokes {
			harness.Eventually(t, 30*time.Second, "spoke "+s.site+" reconnects and is in sync", func() error {
				syncs, err := harness.Metric(s.http, "meshfed_spoke_syncs_total")
				if err != nil || syncs <= before[s.site][1] {
					return fmt.Errorf("syncs %v (before %v), %v", syncs, before[s.site][1], err)
				}
				v, err := harness.View(s.http)
				if err != nil || !v.HubConnected || !v.Synced {
					return fmt.Errorf("view connected=%v synced=%v err=%v", v != nil && v.HubConnected, v != nil && v.Synced, err)
				}
				return nil
			})
		}
		for _, s := range f.spokes {
			recv, err := harness.Metric(s.http, "meshfed_spoke_resources_received_total", `kind="service"`)
			if err != nil {
				t.Fatal(err)
			}
			if recv != before[s.site][0] {
				t.Errorf("spoke %s received %v services after the restart, want 0 (nothing changed)", s.site, recv-before[s.site][0])
			}
		}
		sent, err := harness.Metric(f.hubHTTP, "meshfed_hub_resources_received_total")
		if err != nil {
			t.Fatal(err)
		}
		if sent != 0 {
			t.Errorf("spokes resent %v resources to the restarted hub, want 0: it had all of them", sent)
		}
		f.converged(10*time.Second, wantCatalog(currentRev(t, a.file)))
	})

	t.Run("an invalid services file keeps the last valid catalog", func(t *testing.T) {
		c := f.spokes["c"]
		writeFile(t, c.file, strings.Replace(siteC, "health:", "helth:", 1))
		harness.Eventually(t, 10*time.Second, "the spoke reports the bad file", func() error {
			n, err := harness.Metric(c.http, "meshfed_spoke_source_errors_total")
			if err != nil || n < 1 {
				return fmt.Errorf("source errors %v, %v", n, err)
			}
			return nil
		})
		if log := c.p.Log(); !strings.Contains(log, "unknown field") || !strings.Contains(log, "helth") {
			t.Errorf("spoke log does not name the unknown field:\n%s", log)
		}
		f.converged(5*time.Second, wantCatalog(currentRev(t, a.file)))
		writeFile(t, c.file, siteC)
	})

	t.Run("an empty services file keeps the site's services, and services: [] withdraws them", func(t *testing.T) {
		c := f.spokes["c"]
		f.converged(10*time.Second, wantCatalog(currentRev(t, a.file)))
		before, err := harness.Metric(c.http, "meshfed_spoke_source_errors_total")
		if err != nil {
			t.Fatal(err)
		}
		for _, content := range []string{"", "  \n\n", "# nothing here yet\n"} {
			writeFile(t, c.file, content)
			harness.Eventually(t, 10*time.Second, "the spoke reports the empty file", func() error {
				n, err := harness.Metric(c.http, "meshfed_spoke_source_errors_total")
				if err != nil || n <= before {
					return fmt.Errorf("source errors %v (before %v), %v", n, before, err)
				}
				before = n
				return nil
			})
			// The hub still lists c's services: an empty file is a failed
			// write, not a site that stopped offering them.
			f.converged(3*time.Second, wantCatalog(currentRev(t, a.file)))
		}
		if log := c.p.Log(); !strings.Contains(log, "services: []") {
			t.Errorf("spoke log does not say how to withdraw every service:\n%s", log)
		}
		writeFile(t, c.file, "services: []\n")
		withoutC := strings.TrimSuffix(wantCatalog(currentRev(t, a.file)), "\nc:shop/charlie:127.0.0.31:9000map[]")
		f.converged(10*time.Second, withoutC)
		writeFile(t, c.file, siteC)
		f.converged(10*time.Second, wantCatalog(currentRev(t, a.file)))
	})

	t.Run("site list shows every site connected with its counts", func(t *testing.T) {
		out := f.mustCLI("site", "list", "-o", "json")
		var sites []catalog.Site
		if err := json.Unmarshal([]byte(out), &sites); err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, s := range sites {
			got[s.Name] = fmt.Sprintf("%s %d/%d", s.State, s.Services, s.Endpoints)
		}
		want := map[string]string{"a": "connected 2/3", "b": "connected 2/2", "c": "connected 1/1"}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("site %s: %q, want %q", k, got[k], v)
			}
		}
	})
}

func currentRev(t *testing.T, path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rev int
	i := strings.Index(string(b), `rev: "`)
	fmt.Sscanf(string(b)[i+len(`rev: "`):], "%d", &rev)
	return rev
}

// TestHubPushDurationIsPushes: a spoke that joins long after the catalog
// changed gets it in its initial sync, which meshfed_hub_initial_sync_seconds
// times from the stream's start; meshfed_hub_push_duration_seconds, the
// latency of pushes, does not take the changes' age for one.
func TestHubPushDurationIsPushes(t *testing.T) {
	f := newFederation(t)
	f.addSite("b", "z1", siteB)
	start := time.Now()
	harness.Eventually(t, 20*time.Second, "the hub has b's services", func() error {
		n, err := harness.Metric(f.hubHTTP, "meshfed_hub_catalog_services")
		if err != nil || n != 2 {
			return fmt.Errorf("%v services (%v)", n, err)
		}
		return nil
	})
	// The catalog's changes age before c joins.
	harness.Eventually(t, 10*time.Second, "3 s pass", func() error {
		if time.Since(start) < 3*time.Second {
			return errors.New("not yet")
		}
		return nil
	})
	c := f.addSite("c", "z2", siteC)
	viewIs(t, 20*time.Second, c, "b:default/echo:127.0.0.21:18080map[]\nb:shop/bravo:127.0.0.22:9000map[]\nc:shop/charlie:127.0.0.31:9000map[]")
	all, err := harness.Metric(f.hubHTTP, "meshfed_hub_push_duration_seconds_count")
	if err != nil {
		t.Fatal(err)
	}
	fast, err := harness.Metric(f.hubHTTP, "meshfed_hub_push_duration_seconds_bucket", `le="2.048"`)
	if err != nil {
		t.Fatal(err)
	}
	if all != fast {
		t.Errorf("%v of %v pushes took over 2 s: the initial sync of c was timed from changes made before it joined", all-fast, all)
	}
	if sync, err := harness.Metric(f.hubHTTP, "meshfed_hub_initial_sync_seconds", `site="c"`); err != nil || sync <= 0 || sync > 2 {
		t.Errorf("c's initial sync: %v s (%v)", sync, err)
	}
}
