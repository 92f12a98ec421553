package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// HAProxy starts Debian's HAProxy (`make tools` installs it) with the
// sections given, after global and defaults for TCP mode: the peer the
// benchmarks measure meshfed against.
func HAProxy(t testing.TB, name, sections string) *Process {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatal("haproxy is missing: `make tools` installs Debian's")
	}
	cfg := filepath.Join(t.TempDir(), name+".cfg")
	conf := `global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
` + sections
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return Start(t, name, bin, "-db", "-f", cfg)
}
