package harness

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
)

var (
	buildMu  sync.Mutex
	buildDir string
	built    = map[string]string{}
)

// Binary builds cmd/meshfed once per test process and returns its path.
func Binary(t testing.TB) string { return Command(t, "meshfed") }

// Command builds cmd/<name> (CGO_ENABLED=0) once per test process and
// returns its path.
func Command(t testing.TB, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[name]; ok {
		return p
	}
	if buildDir == "" {
		dir, err := os.MkdirTemp("", "meshfed-bin-")
		if err != nil {
			t.Fatal(err)
		}
		buildDir = dir
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(buildDir, name)
	// The Makefile's tags: grpc without x/net/trace.
	cmd := exec.Command("go", "build", "-tags", "grpcnotrace", "-o", bin, "./cmd/"+name)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v: %s", name, err, out)
	}
	built[name] = bin
	return bin
}

// Main runs a package's tests (or benchmarks) and then removes the
// binaries Binary and Command built; a TestMain of every package that uses
// them returns through it: os.Exit(harness.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	return code
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// GetText fetches an HTTP URL's body.
func GetText(url string) (string, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("%s: %s: %s", url, resp.Status, b)
	}
	return string(b), nil
}

// Metric sums the samples of a Prometheus metric at addr whose labels
// include every pair in match ("name" alone matches all samples).
func Metric(addr, name string, match ...string) (float64, error) {
	body, err := GetText("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || len(line) == len(name) || (line[len(name)] != '{' && line[len(name)] != ' ') {
			continue
		}
		ok := true
		for _, m := range match {
			if !strings.Contains(line, m) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	return sum, nil
}

// View fetches a spoke's federated view from its HTTP address.
func View(addr string) (*catalog.SiteView, error) {
	body, err := GetText("http://" + addr + "/v1/catalog")
	if err != nil {
		return nil, err
	}
	var v catalog.SiteView
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// WaitReady polls addr's /readyz until it answers 200.
func WaitReady(t testing.TB, addr string, within time.Duration) {
	t.Helper()
	Eventually(t, within, addr+" ready", func() error {
		_, err := GetText("http://" + addr + "/readyz")
		return err
	})
}
