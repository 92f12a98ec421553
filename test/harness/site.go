package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Site is a hub with one docker-kind site and its spoke (the built
// binary), for benchmarks of the data plane.
type Site struct {
	Name, Dir                        string
	Identity, XDS, SpokeHTTP, HubRPC string
	bin                              string
	spokeArgs                        []string
	spoke                            *Process
}

// StartSite starts a hub (federation "bench.meshfed") and site name (region
// r1, zone z1) whose spoke serves the services file content.
func StartSite(t testing.TB, name, services string) *Site {
	t.Helper()
	s := &Site{Name: name, Dir: t.TempDir(), bin: Binary(t), HubRPC: FreePort(t)}
	hubHTTP := FreePort(t)
	Start(t, "hub", s.bin, "hub", "--data-dir", filepath.Join(s.Dir, "hub"), "--listen", s.HubRPC, "--http-listen", hubHTTP, "--federation", "bench.meshfed")
	WaitReady(t, hubHTTP, 30*time.Second)
	s.startSpoke(t, "z1", "docker", services)
	return s
}

// Join registers another site at s's hub (region r1, zone zone) and starts
// its spoke, serving the services file content.
func (s *Site) Join(t testing.TB, name, zone, services string) *Site {
	t.Helper()
	return s.JoinWith(t, name, zone, "docker", services)
}

// JoinWith is Join for a site of kind, whose spoke takes args too; with no
// services ("") the spoke gets no services file.
func (s *Site) JoinWith(t testing.TB, name, zone, kind, services string, args ...string) *Site {
	t.Helper()
	o := &Site{Name: name, Dir: s.Dir, bin: s.bin, HubRPC: s.HubRPC}
	o.startSpoke(t, zone, kind, services, args...)
	return o
}

func (s *Site) startSpoke(t testing.TB, zone, kind, services string, args ...string) {
	t.Helper()
	s.CLI(t, "site", "add", s.Name, "--kind", kind, "--region", "r1", "--zone", zone, "--gateway-address", "127.0.0.1:15443")
	s.SpokeHTTP, s.Identity, s.XDS = FreePort(t), FreePort(t), FreePort(t)
	s.spokeArgs = []string{"spoke", "--site", s.Name, "--hub", s.HubRPC, "--token", s.CLI(t, "site", "token", "create", "--site", s.Name),
		"--data-dir", filepath.Join(s.Dir, s.Name), "--http-listen", s.SpokeHTTP, "--identity-listen", s.Identity, "--xds-listen", s.XDS}
	if services != "" {
		file := filepath.Join(s.Dir, s.Name+"-services.yaml")
		if err := os.WriteFile(file, []byte(services), 0o600); err != nil {
			t.Fatal(err)
		}
		s.spokeArgs = append(s.spokeArgs, "--services", file, "--services-poll", "100ms")
	}
	s.spokeArgs = append(s.spokeArgs, args...)
	s.spoke = Start(t, "spoke-"+s.Name, s.bin, s.spokeArgs...)
	WaitReady(t, s.SpokeHTTP, 30*time.Second)
}

// RestartSpoke kills the site's spoke and starts it again on its data
// dir (its token spent: the credential there is used).
func (s *Site) RestartSpoke(t testing.TB) {
	t.Helper()
	s.spoke.Kill()
	s.spoke = Start(t, "spoke-"+s.Name, s.bin, s.spokeArgs...)
	WaitReady(t, s.SpokeHTTP, 30*time.Second)
}

// ServicesFile is the spoke's services file, to edit.
func (s *Site) ServicesFile() string { return filepath.Join(s.Dir, s.Name+"-services.yaml") }

// Bin is the meshfed binary the site runs.
func (s *Site) Bin() string { return s.bin }

// CLI runs a meshfed command as the hub's admin and returns its output.
func (s *Site) CLI(t testing.TB, args ...string) string {
	t.Helper()
	out, err := Run(s.bin, append([]string{"--config", filepath.Join(s.Dir, "hub", "admin.conf")}, args...)...)
	if err != nil {
		t.Fatalf("meshfed %s: %v", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(out)
}

// DataPlane starts `<bin> args...` attested as node (a fresh node token)
// against the site's spoke, and waits until it is ready; it returns the
// process and its HTTP address.
func (s *Site) DataPlane(t testing.TB, bin, node string, args ...string) (*Process, string) {
	t.Helper()
	http := FreePort(t)
	p := Start(t, node, bin, append(args, "--identity", s.Identity, "--xds", s.XDS, "--http-listen", http,
		"--token", s.CLI(t, "vm", "token", "create", "--site", s.Name, "--node", node))...)
	WaitReady(t, http, 30*time.Second)
	return p, http
}
