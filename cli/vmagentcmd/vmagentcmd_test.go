package vmagentcmd

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The agent's --config sets the flags it names, the command line wins, and
// a misspelt key is refused with the keys there are.
func TestVMAgentConfigFile(t *testing.T) {
	cmd := New(slog.Default, "test")
	dir := t.TempDir()
	path := filepath.Join(dir, "vmagent.yaml")
	if err := os.WriteFile(path, []byte("spoke: dc1-spoke:7181\ndata-dir: /var/lib/x\nnetwork: apps\ncheck-interval: 5s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cmd.ParseFlags([]string{"--network", "other"}); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(cmd, path); err != nil {
		t.Fatal(err)
	}
	f := cmd.Flags()
	for flag, want := range map[string]string{"spoke": "dc1-spoke:7181", "data-dir": "/var/lib/x", "network": "other", "check-interval": "5s"} {
		if got := f.Lookup(flag).Value.String(); got != want {
			t.Errorf("--%s = %q, want %q", flag, got, want)
		}
	}

	if err := os.WriteFile(path, []byte("spoke: a:1\ndata-dir: /x\nnetwrok: apps\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := applyConfigFile(New(slog.Default, "test"), path)
	if err == nil || !strings.Contains(err.Error(), `unknown key "netwrok"`) || !strings.Contains(err.Error(), "network") {
		t.Errorf("a misspelt key: %v", err)
	}
	if err := applyConfigFile(New(slog.Default, "test"), ""); err == nil || !strings.Contains(err.Error(), "--spoke is required") {
		t.Errorf("no spoke anywhere: %v", err)
	}
}
