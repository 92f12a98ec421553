// Package arch checks that imports run the way docs/architecture.md says:
// components meet over protocols, never by importing each other.
package arch

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/meshfed/meshfed/"

// rule: a package under from (our path, "" for all) imports nothing under
// any of never, which may be ours (no module prefix) or anyone's (a full
// path such as k8s.io/); except lists packages of from that are exempt.
type rule struct {
	from   string
	exact  bool // from is one package, not a folder
	never  []string
	except []string
	why    string
}

var components = []string{"hub", "spoke", "proxy", "gateway", "vmagent", "cli", "cmd"}

var rules = []rule{
	{from: "api", never: []string{""}, why: "api/ holds the protobuf and imports nothing of ours"},
	{from: "catalog", never: []string{""}, why: "catalog/ is the shared model and imports nothing of ours"},
	{from: "trust", never: append(components, "dataplane", "federation", "store", "gossip", "hubclient", "identityclient"), why: "trust/ imports only catalog-level types and go-spiffe, never a component"},
	{from: "hub", never: []string{"hubclient", "identityclient", "spoke", "gateway", "proxy", "vmagent", "dataplane", "cli", "k8s.io/", "github.com/docker/", "github.com/hashicorp/consul/"}, why: "the hub knows sites only through the API; the token format and credential file it shares are in trust/credential"},
	{from: "spoke", never: []string{"hub", "proxy", "gateway", "vmagent", "dataplane", "cli"}, why: "the spoke is the hub's and the data plane's peer over gRPC and xDS"},
	{from: "spoke", exact: true, never: []string{"k8s.io/", "github.com/docker/", "github.com/hashicorp/consul/", "spoke/kube"}, why: "a site kind's client library stays in its folder under spoke/"},
	{from: "proxy", never: []string{"gateway", "hub", "spoke", "vmagent", "cli"}, why: "the proxy is an xDS client; what it shares with the gateway is in dataplane/"},
	{from: "gateway", never: []string{"proxy", "hub", "spoke", "vmagent", "cli"}, why: "the gateway is an xDS client; what it shares with the proxy is in dataplane/"},
	{from: "vmagent", never: []string{"hub", "spoke", "gateway", "cli"}, why: "the vmagent is an API client of its spoke"},
	{from: "dataplane", never: components, why: "the data-plane engine is below the components that use it"},
	{from: "", never: []string{"cli", "cmd"}, except: []string{"cli", "cmd"}, why: "the CLI wires components together and is imported by nothing"},
}

// under: path (ours, without the module prefix) is folder or inside it.
func under(path, folder string) bool {
	return folder == "" || path == folder || strings.HasPrefix(path, folder+"/")
}

// violations lists every import in graph (package → its imports, full
// paths) that a rule forbids.
func violations(graph map[string][]string) []string {
	var out []string
	for pkg, imports := range graph {
		from, ok := strings.CutPrefix(pkg, module)
		if !ok {
			continue
		}
		for _, r := range rules {
			if r.exact && from != r.from || !r.exact && !under(from, r.from) {
				continue
			}
			exempt := false
			for _, e := range r.except {
				exempt = exempt || under(from, e)
			}
			if exempt {
				continue
			}
			for _, imp := range imports {
				for _, n := range r.never {
					ours, isOurs := strings.CutPrefix(imp, module)
					bad := false
					switch {
					case strings.Contains(n, "."):
						bad = strings.HasPrefix(imp, n)
					case isOurs && n == "":
						bad = true
					case isOurs && r.exact:
						bad = under(ours, n) && ours != r.from
					case isOurs:
						bad = under(ours, n) && !under(ours, r.from)
					}
					if bad {
						out = append(out, from+" imports "+imp+": "+r.why)
					}
				}
			}
		}
	}
	return out
}

// TestImportsFollowTheArchitecture runs the rules over the real tree
// (every package and its tests).
func TestImportsFollowTheArchitecture(t *testing.T) {
	cmd := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}} {{join .TestImports " "}}`, module+"...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, stderr.String())
	}
	graph := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 0 {
			graph[f[0]] = f[1:]
		}
	}
	if len(graph) < 20 {
		t.Fatalf("go list found %d packages; want the whole module", len(graph))
	}
	for _, v := range violations(graph) {
		t.Error(v)
	}
}

// TestPlantedViolationsAreFound: the check fails on the imports it is for.
func TestPlantedViolationsAreFound(t *testing.T) {
	for _, tc := range []struct{ from, imp string }{
		{"proxy", module + "gateway"},
		{"gateway", module + "proxy"},
		{"hub", module + "spoke"},
		{"hub/store", "k8s.io/client-go/kubernetes"},
		{"spoke", "k8s.io/client-go/kubernetes"},
		{"spoke", module + "spoke/kube"},
		{"spoke/xds", module + "hub"},
		{"dataplane/loop", module + "proxy"},
		{"trust/mtls", module + "hub"},
		{"catalog", module + "trust/ca"},
		{"hub", module + "cli"},
	} {
		if v := violations(map[string][]string{module + tc.from: {tc.imp}}); len(v) == 0 {
			t.Errorf("%s importing %s passes the check; want it refused", tc.from, tc.imp)
		}
	}
	allowed := map[string][]string{
		module + "proxy":      {module + "dataplane/loop", module + "trust/mtls"},
		module + "spoke/kube": {"k8s.io/client-go/kubernetes"},
		module + "cli":        {module + "hub", module + "spoke", module + "cli/proxycmd"},
		module + "trust/mtls": {module + "trust/ca"},
	}
	if v := violations(allowed); len(v) > 0 {
		t.Errorf("imports the architecture allows are refused: %v", v)
	}
}
