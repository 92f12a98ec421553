// Package vm_test runs deploy/vm/install.sh in throwaway roots: install,
// reinstall, upgrade and uninstall, and systemd-analyze verify on the unit
// it writes.
package vm_test

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// install runs the script into root; it returns the output and whether
// it succeeded.
func install(t *testing.T, root string, args ...string) (string, bool) {
	t.Helper()
	cmd := exec.Command("./install.sh", append([]string{"--root", root}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

func mustInstall(t *testing.T, root string, args ...string) string {
	t.Helper()
	out, ok := install(t, root, args...)
	if !ok {
		t.Fatalf("install.sh %s failed:\n%s", strings.Join(args, " "), out)
	}
	return out
}

// tree lists every file and directory under root: its mode, its path and
// a hash of its content.
func tree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%v /%s", info.Mode(), strings.TrimPrefix(path, root))
		if !d.IsDir() {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %x", sha256.Sum256(data))
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func fakeBinary(t *testing.T, version string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "meshfed-vmagent")
	if err := os.WriteFile(path, []byte("#!/bin/sh\necho meshfed "+version+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// verify runs systemd-analyze verify on the installed unit, in a copy of
// root that also holds the host's own units (the targets it names); any
// word from it, a warning too, is a failure.
func verify(t *testing.T, root string) {
	t.Helper()
	vroot := t.TempDir()
	if out, err := exec.Command("cp", "-a", root+"/.", vroot).CombinedOutput(); err != nil {
		t.Fatalf("copy the root: %v: %s", err, out)
	}
	if err := os.MkdirAll(filepath.Join(vroot, "usr/lib/systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", "/lib/systemd/system", filepath.Join(vroot, "usr/lib/systemd/")).CombinedOutput(); err != nil {
		t.Fatalf("the host's systemd units (install Debian's systemd): %v: %s", err, out)
	}
	out, err := exec.Command("systemd-analyze", "verify", "--root="+vroot, "/etc/systemd/system/meshfed-vmagent.service").CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v:\n%s", err, out)
	}
}

func TestInstallReinstallUpgradeUninstall(t *testing.T) {
	root := t.TempDir()
	empty := tree(t, root)
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("mf1.abc.def\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	v1, v2 := fakeBinary(t, "v1"), fakeBinary(t, "v2")
	args := []string{"--spoke", "dc1-spoke:7181", "--token-file", tokenFile, "--network", "apps", "--binary", v1}

	t.Run("the first install needs a token", func(t *testing.T) {
		out, ok := install(t, t.TempDir(), "--spoke", "dc1-spoke:7181", "--binary", v1)
		if ok || !strings.Contains(out, "needs a node token") {
			t.Errorf("without a token: ok=%v\n%s", ok, out)
		}
	})

	mustInstall(t, root, args...)
	config, err := os.ReadFile(filepath.Join(root, "etc/meshfed/vmagent.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"spoke: dc1-spoke:7181\n", "data-dir: /var/lib/meshfed-vmagent\n", "network: apps\n", "token: mf1.abc.def\n"} {
		if !strings.Contains(string(config), want) {
			t.Errorf("vmagent.yaml lacks %q:\n%s", want, config)
		}
	}
	for path, mode := range map[string]os.FileMode{"etc/meshfed/vmagent.yaml": 0o600, "etc/meshfed": 0o700 | os.ModeDir, "usr/local/bin/meshfed-vmagent": 0o755, "etc/systemd/system/meshfed-vmagent.service": 0o644} {
		if info, err := os.Stat(filepath.Join(root, path)); err != nil || info.Mode() != mode {
			t.Errorf("%s: mode %v (%v), want %v", path, info.Mode(), err, mode)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(root, "etc/systemd/system/meshfed-vmagent.service"))
	for _, want := range []string{"NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/run/docker.sock", "ExecStart=/usr/local/bin/meshfed-vmagent --config /etc/meshfed/vmagent.yaml"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit lacks %s", want)
		}
	}
	verify(t, root)

	installed := tree(t, root)
	t.Run("a reinstall with the same arguments changes nothing", func(t *testing.T) {
		mustInstall(t, root, args...)
		if got := tree(t, root); !slices.Equal(got, installed) {
			t.Errorf("the tree changed:\n%s\nwas:\n%s", strings.Join(got, "\n"), strings.Join(installed, "\n"))
		}
	})

	t.Run("an upgrade replaces the binary and keeps the config", func(t *testing.T) {
		// The agent has run: its state is there.
		if err := os.MkdirAll(filepath.Join(root, "var/lib/meshfed-vmagent"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "var/lib/meshfed-vmagent/svid.pem"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		mustInstall(t, root, "--binary", v2)
		if got, _ := os.ReadFile(filepath.Join(root, "usr/local/bin/meshfed-vmagent")); !strings.Contains(string(got), "v2") {
			t.Errorf("the binary was not upgraded: %s", got)
		}
		if got, _ := os.ReadFile(filepath.Join(root, "etc/meshfed/vmagent.yaml")); string(got) != string(config) {
			t.Errorf("the upgrade changed the config:\n%s", got)
		}
		if _, err := os.Stat(filepath.Join(root, "var/lib/meshfed-vmagent/svid.pem")); err != nil {
			t.Errorf("the upgrade lost the node's SVID: %v", err)
		}
	})

	t.Run("uninstall leaves nothing behind", func(t *testing.T) {
		mustInstall(t, root, "--uninstall")
		var left []string
		for _, line := range tree(t, root) {
			if isDir := strings.HasPrefix(line, "d"); !slices.Contains(empty, line) && !isDir {
				left = append(left, line)
			}
		}
		for _, p := range []string{"etc/meshfed", "var/lib/meshfed-vmagent"} {
			if _, err := os.Stat(filepath.Join(root, p)); err == nil {
				left = append(left, p)
			}
		}
		if len(left) > 0 {
			t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
		}
		mustInstall(t, root, "--uninstall") // twice is fine
	})
}
