package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
)

// TestHubReplicas: two hubs share one etcd. East's spoke joins hub A and
// west's joins hub B, with the site and its token made through A. Each
// sees the other's services and their changes, and shows both sites
// connected; an outside trust domain
// federated through A is refreshed by B while A is down; and a site
// removed through B is gone from A, from its catalog and from west's view.
func TestHubReplicas(t *testing.T) {
	storeArgs := []string{"--store", "etcd", "--etcd-endpoints", harness.Etcd(t), "--etcd-prefix", "/replicas/"}
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
	onB := func(want string) {
		t.Helper()
		harness.Eventually(t, 20*time.Second, "hub B has the whole catalog", func() error {
			got, err := catalogVia(cliB)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("hub B's catalog:\n%s\nwant:\n%s", got, want)
			}
			return nil
		})
	}
	f.converged(20*time.Second, want(1))
	onB(want(1))
	// Each hub shows both sites connected, whichever holds the stream.
	for hub, cli := range map[string]func(...string) (string, error){"A": f.cli, "B": cliB} {
		harness.Eventually(t, 10*time.Second, "hub "+hub+" shows both sites connected", func() error {
			out, err := cli("site", "list", "-o", "json")
			if err != nil {
				return err
			}
			var sites []struct{ Name, State string }
			if err := json.Unmarshal([]byte(out), &sites); err != nil {
				return err
			}
			for _, s := range sites {
				if s.State != catalog.StateConnected {
					return fmt.Errorf("hub %s shows %s %s", hub, s.Name, s.State)
				}
			}
			if len(sites) != 2 {
				return fmt.Errorf("hub %s lists %d sites, want 2", hub, len(sites))
			}
			return nil
		})
	}

	// A change at east travels east -> A -> etcd -> B -> west.
	writeFile(t, f.spokes["east"].file, servicesYAML(2, ""))
	f.converged(20*time.Second, want(2))
	onB(want(2))

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
	onB(westOnly)
	harness.Eventually(t, 20*time.Second, "hub A forgot east", func() error {
		sites, err := f.cli("site", "list")
		if err != nil {
			return err
		}
		if strings.Contains(sites, "east") {
			return fmt.Errorf("hub A still lists east:\n%s", sites)
		}
		got, err := f.hubCatalog()
		if err != nil {
			return err
		}
		if got != westOnly {
			return fmt.Errorf("hub A's catalog:\n%s\nwant:\n%s", got, westOnly)
		}
		return nil
	})
	harness.Eventually(t, 20*time.Second, "west's view without east", func() error {
		v, err := harness.View(west.http)
		if err != nil {
			return err
		}
		if got := entries(v.Services); got != westOnly {
			return fmt.Errorf("west's view:\n%s\nwant:\n%s", got, westOnly)
		}
		return nil
	})
}

// TestHubRestartShowsStreamsGone: a hub killed while a spoke held its
// stream, restarted after the spoke died too, shows the site stale, not
// connected (the stored record still names the hub as holding it).
func TestHubRestartShowsStreamsGone(t *testing.T) {
	f := newFederation(t)
	east := f.addSite("east", "e-1", servicesYAML(1, ""))
	state := func() (string, error) {
		out, err := f.cli("site", "list", "-o", "json")
		if err != nil {
			return "", err
		}
		var sites []struct{ Name, State string }
		if err := json.Unmarshal([]byte(out), &sites); err != nil || len(sites) != 1 {
			return "", fmt.Errorf("site list: %v: %s", err, out)
		}
		return sites[0].State, nil
	}
	harness.Eventually(t, 20*time.Second, "east connected", func() error {
		if s, err := state(); err != nil || s != catalog.StateConnected {
			return fmt.Errorf("east is %q (%v)", s, err)
		}
		return nil
	})
	f.hub.Kill()
	east.p.Kill()
	f.startHub()
	if s, err := state(); err != nil || s != catalog.StateStale {
		t.Fatalf("after the restart east is %q (%v), want %s", s, err, catalog.StateStale)
	}
}
