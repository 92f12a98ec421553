package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/test/harness"
)

// TestHubReplicas: two hubs share one etcd. East's spoke joins hub A and
// west's joins hub B, with the site and its token made through A. Each
// sees the other's services and their changes, and shows both sites
// connected; an outside trust domain
// federated through A is refreshed by B while A is down; and a site
// removed through B is gone from A, from its catalog and from west's view.
func TestHubReplicas(t *testing.T) {
	etcd := harness.Etcd(t)
	storeArgs := []string{"--store", "etcd", "--etcd-endpoints", etcd, "--etcd-prefix", "/replicas/"}
	f := newFederation(t, storeArgs...)
	bAddr, bHTTP := harness.FreePort(t), harness.FreePort(t)
	harness.Start(t, "hub-b", f.bin, append([]string{"hub", "--data-dir", filepath.Join(f.dir, "hub-b"), "--listen", bAddr,
		"--http-listen", bHTTP, "--federation", "test.meshfed"}, storeArgs...)...)
	harness.WaitReady(t, bHTTP, 30*time.Second)
	cliB := func(args ...string) (string, error) {
		return harness.Run(f.bin, append([]string{"--config", filepath.Join(f.dir, "hub-b", "admin.conf")}, args...)...)
	}

	f.addSite("east", "e-1", servicesYAML(1, ""))
	west := f.addSite("west", "w-1", siteB, "--hub", bAddr)
	want := func(rev int) string {
		return strings.Join([]string{
			fmt.Sprintf("east:default/echo:127.0.0.11:18080map[rev:%d],127.0.0.12:18080map[]", rev),
			"west:default/echo:127.0.0.21:18080map[]",
			"west:shop/bravo:127.0.0.22:9000map[]",
		}, "\n")
	}
	f.converged(20*time.Second, want(1))
	catalogIs(t, 20*time.Second, "hub B", cliB, want(1))
	// Each hub shows both sites connected, whichever holds the stream.
	for hub, cli := range map[string]func(...string) (string, error){"A": f.cli, "B": cliB} {
		harness.Eventually(t, 10*time.Second, "hub "+hub+" shows both sites connected", func() error {
			states, err := siteStates(cli)
			if err != nil {
				return err
			}
			if want := map[string]string{"east": catalog.StateConnected, "west": catalog.StateConnected}; !maps.Equal(states, want) {
				return fmt.Errorf("hub %s shows %v, want %v", hub, states, want)
			}
			return nil
		})
	}

	// A change at east travels east -> A -> etcd -> B -> west.
	writeFile(t, f.spokes["east"].file, servicesYAML(2, ""))
	f.converged(20*time.Second, want(2))
	catalogIs(t, 20*time.Second, "hub B", cliB, want(2))

	// An outside trust domain federated through A is refreshed by B as
	// well: with A down, B still picks up the peer's next bundle.
	outside := newOutsideDomain(t)
	f.mustCLI(outside.federate()...)
	harness.Eventually(t, 10*time.Second, "hub B holds example.org", func() error { return trustListHas(cliB, "example.org", 1, 1) })
	f.hub.Kill()
	outside.addRoot(t)
	harness.Eventually(t, 15*time.Second, "hub B refreshed example.org with hub A down", func() error {
		return trustListHas(cliB, "example.org", 2, 2)
	})
	f.startHub()

	// East removed through B: A drops it too, and west's view loses it.
	if _, err := cliB("site", "remove", "east"); err != nil {
		t.Fatal(err)
	}
	westOnly := "west:default/echo:127.0.0.21:18080map[]\nwest:shop/bravo:127.0.0.22:9000map[]"
	catalogIs(t, 20*time.Second, "hub B", cliB, westOnly)
	harness.Eventually(t, 20*time.Second, "hub A forgot east", func() error {
		states, err := siteStates(f.cli)
		if err != nil {
			return err
		}
		if _, ok := states["east"]; ok {
			return fmt.Errorf("hub A still lists east: %v", states)
		}
		return nil
	})
	catalogIs(t, 20*time.Second, "hub A", f.cli, westOnly)
	viewIs(t, 20*time.Second, west, westOnly)
	// East's spoke was connected to A meanwhile, and kept writing: nothing
	// of east is left in the store.
	st, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: []string{etcd}, Prefix: "/replicas/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	kvs, err := st.List(context.Background(), "sites/west")
	if err == nil && len(kvs) == 1 {
		kvs, err = st.List(context.Background(), "")
	}
	if err != nil || len(kvs) < 2 {
		t.Fatalf("the store under /replicas/: %d keys, %v; want west's among them", len(kvs), err)
	}
	for _, kv := range kvs {
		if strings.Contains(kv.Key, "east") || strings.Contains(string(kv.Value), `"site":"east"`) {
			t.Errorf("after east's removal the store still holds %s", kv.Key)
		}
	}
}

// siteStates is each site's state as a hub's `site list` shows it.
func siteStates(cli func(...string) (string, error)) (map[string]string, error) {
	out, err := cli("site", "list", "-o", "json")
	if err != nil {
		return nil, err
	}
	var sites []struct{ Name, State string }
	if err := json.Unmarshal([]byte(out), &sites); err != nil {
		return nil, fmt.Errorf("site list: %w: %s", err, out)
	}
	states := map[string]string{}
	for _, s := range sites {
		states[s.Name] = s.State
	}
	return states, nil
}

// TestHubRestartShowsStreamsGone: a hub killed while a spoke held its
// stream, restarted after the spoke died too, shows the site stale, not
// connected (the stored record still names the hub as holding it).
func TestHubRestartShowsStreamsGone(t *testing.T) {
	f := newFederation(t)
	east := f.addSite("east", "e-1", servicesYAML(1, ""))
	harness.Eventually(t, 20*time.Second, "east connected", func() error {
		if states, err := siteStates(f.cli); err != nil || states["east"] != catalog.StateConnected {
			return fmt.Errorf("sites %v (%v)", states, err)
		}
		return nil
	})
	f.hub.Kill()
	east.p.Kill()
	f.startHub()
	if states, err := siteStates(f.cli); err != nil || states["east"] != catalog.StateStale {
		t.Fatalf("after the restart the sites are %v (%v), want east %s", states, err, catalog.StateStale)
	}
}
