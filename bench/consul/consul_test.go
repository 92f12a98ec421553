// Package consul benchmarks a Consul site on a real Consul agent: how soon
// a service registered in Consul is a healthy endpoint in another site's
// EDS, and what importing 1,000 federated services into Consul writes, the
// first time and after a spoke restart. `make bench` runs it once; `go
// test` alone runs no benchmark.
package consul

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/bench/load"
	"github.com/meshfed/meshfed/spoke/xds"
	"github.com/meshfed/meshfed/test/harness"
)

// TestMain removes the binaries the benchmark built.
func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

const (
	registered = 100  // Consul services registered one at a time and timed
	imported   = 1000 // federated services the Consul site imports
)

func BenchmarkConsul(b *testing.B) {
	c := harness.StartConsul(b, "dc1")
	west := harness.StartSite(b, "west", "services: []\n")
	dc1 := west.JoinWith(b, "dc1", "z1", "consul", "", "--consul-addr", "http://"+c.Addr, "--consul-register-prefix", "127.134.0.0/16")
	obs := harness.WatchEDS(b, west, "observer", "dc1")

	var lat []time.Duration
	for i := range registered {
		name := fmt.Sprintf("svc-%d", i)
		start := time.Now()
		if err := c.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name, Name: name, Port: 8080, Address: "127.0.0.41", Tags: []string{"meshfed-export"}}); err != nil {
			b.Fatal(err)
		}
		at, err := obs.Healthy(xds.ClusterName("default", name, 8080, ""), 30*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, at.Sub(start))
	}
	slices.Sort(lat)
	p50, p99 := load.Percentile(lat, 50), load.Percentile(lat, 99)

	// 1,000 services of west, which dc1's spoke registers in Consul.
	var file strings.Builder
	file.WriteString("services:\n")
	for i := range imported {
		fmt.Fprintf(&file, "- {namespace: default, name: w-%d, ports: [{port: 9080}], endpoints: [{address: 127.0.0.51, port: 9080}]}\n", i)
	}
	if err := os.WriteFile(west.ServicesFile(), []byte(file.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	registeredAll := func() error {
		n, err := harness.Metric(dc1.SpokeHTTP, "meshfed_consul_services_registered")
		if err != nil || n != imported {
			return fmt.Errorf("%v registered (%v)", n, err)
		}
		return nil
	}
	harness.Eventually(b, 120*time.Second, "dc1's spoke registers west's services in Consul", registeredAll)
	took := time.Since(start)
	writes, err := harness.Metric(dc1.SpokeHTTP, "meshfed_consul_writes_total")
	if err != nil {
		b.Fatal(err)
	}
	svcs, _, err := c.Client.Catalog().Services(nil)
	if err != nil {
		b.Fatal(err)
	}
	inConsul := 0
	for name := range svcs {
		if strings.HasPrefix(name, "w-") {
			inConsul++
		}
	}
	dc1.RestartSpoke(b)
	harness.Eventually(b, 60*time.Second, "the restarted spoke compares its registrations with Consul", registeredAll)
	again, err := harness.Metric(dc1.SpokeHTTP, "meshfed_consul_writes_total")
	if err != nil {
		b.Fatal(err)
	}

	fmt.Printf("consul: register in Consul -> healthy endpoint in another site's EDS, %d services one at a time: p50 %.0f ms, p99 %.0f ms\n", registered, load.Ms(p50), load.Ms(p99))
	fmt.Printf("consul: %d federated services imported into Consul: %.0f writes in %.1f s (%.0f writes/s, bounded at 100/s), %d in Consul's catalog; after a spoke restart with nothing changed: %.0f writes\n",
		imported, writes, took.Seconds(), writes/took.Seconds(), inConsul, again)
	fmt.Printf("\n%-52s %-12s %-10s %s\n", "FIGURE", "TARGET", "MEASURED", "RESULT")
	fmt.Printf("%-52s %-12s %-10s %s\n", "consul register -> other site's EDS, p99", "<= 1000 ms", fmt.Sprintf("%.0f ms", load.Ms(p99)), load.Verdict(p99 <= time.Second))
	fmt.Printf("%-52s %-12s %-10s %s\n", "consul writes after a restart, nothing changed", "0", fmt.Sprintf("%.0f", again), load.Verdict(again == 0))
	// make bench exits non-zero on a miss.
	if p99 > time.Second {
		b.Errorf("MISSED: Consul registration -> other site's EDS p99 %v, target 1 s", p99)
	}
	if again != 0 {
		b.Errorf("MISSED: %.0f writes to Consul after a restart with nothing changed, target 0", again)
	}
}
