package harness

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Docker runs the docker CLI and returns its trimmed output, failing the
// test on an error.
func Docker(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("docker %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// Unique is a short random name for Docker objects a test makes, so runs
// never collide.
func Unique(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// ScratchImage builds an image FROM scratch around the static binary of
// ./<pkg> (built with CGO_ENABLED=0) as its entrypoint, and removes it
// when the test ends.
func ScratchImage(t testing.TB, pkg string) string {
	t.Helper()
	dir := t.TempDir()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "app"), "./"+pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v: %s", pkg, err, out)
	}
	return BuildImage(t, dir, "FROM scratch\nCOPY app /app\nENTRYPOINT [\"/app\"]\n")
}

// BuildImage builds dir (the files the Dockerfile copies) with dockerfile,
// and removes the image when the test ends.
func BuildImage(t testing.TB, dir, dockerfile string) string {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o600); err != nil {
		t.Fatal(err)
	}
	tag := Unique("meshfed-test") + ":latest"
	Docker(t, "build", "-q", "-t", tag, dir)
	t.Cleanup(func() { _ = exec.Command("docker", "rmi", "-f", tag).Run() })
	return tag
}

// DockerNetwork creates a bridge network for the test and removes it (and
// every container left on it) when the test ends.
func DockerNetwork(t testing.TB) string {
	t.Helper()
	name := Unique("meshfed-test")
	Docker(t, "network", "create", name)
	t.Cleanup(func() {
		out, _ := exec.Command("docker", "ps", "-aq", "--filter", "network="+name).Output()
		for _, id := range strings.Fields(string(out)) {
			_ = exec.Command("docker", "rm", "-f", id).Run()
		}
		_ = exec.Command("docker", "network", "rm", name).Run()
	})
	return name
}
