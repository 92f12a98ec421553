package harness

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Etcd starts a one-member etcd (Debian's etcd-server) on loopback with its
// data in a temp dir and returns its client URL.
func Etcd(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd is not installed: run `make tools` (it installs Debian's etcd-server)")
	}
	client, peer := FreePort(t), FreePort(t)
	dir := filepath.Join(t.TempDir(), "etcd")
	Start(t, "etcd", bin,
		"--name", "meshfed-test",
		"--data-dir", dir,
		"--listen-client-urls", "http://"+client,
		"--advertise-client-urls", "http://"+client,
		"--listen-peer-urls", "http://"+peer,
		"--initial-advertise-peer-urls", "http://"+peer,
		"--initial-cluster", "meshfed-test=http://"+peer,
		"--log-level", "error",
	)
	Eventually(t, 20*time.Second, "etcd answers", func() error {
		c, err := net.DialTimeout("tcp", client, time.Second)
		if err != nil {
			return err
		}
		c.Close()
		out, err := Run("curl", "-sf", "http://"+client+"/health")
		if err != nil {
			return err
		}
		if out == "" {
			return fmt.Errorf("empty /health")
		}
		return nil
	})
	return "http://" + client
}
