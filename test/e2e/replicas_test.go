package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
)

// TestHubReplicas: two hubs share one etcd. East's spoke joins hub A and
// west's joins hub B, with the site and its token made through A. Each
// sees the other's services and their changes; an outside trust domain
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
