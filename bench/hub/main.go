// Command hub benchmarks the federation protocol end to end: a real hub
// process (the built binary), N in-process spokes joined with tokens, and a
// catalog of E endpoints. It prints propagation latency of one endpoint
// change to every other spoke at a fixed change rate, the initial sync time
// of a new spoke, and the hub's RSS per endpoint, each against its target.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/spoke"
	"github.com/meshfed/meshfed/test/harness"
)

func main() {
	bin := flag.String("meshfed", "bin/meshfed", "the meshfed binary to run the hub from")
	spokes := flag.Int("spokes", 10, "spokes")
	endpoints := flag.Int("endpoints", 100_000, "federated endpoints in all")
	perService := flag.Int("endpoints-per-service", 100, "endpoints per service")
	rate := flag.Int("rate", 100, "endpoint changes per second")
	changes := flag.Int("changes", 1000, "changes to measure")
	flag.Parse()
	if err := run(*bin, *spokes, *endpoints, *perService, *rate, *changes); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type bench struct {
	bin, dir, hubAddr, config string
	hub                       *exec.Cmd
	log                       *slog.Logger
}

func run(bin string, nSpokes, nEndpoints, perService, rate, nChanges int) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, err := os.MkdirTemp("", "meshfed-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b := &bench{bin: bin, dir: dir, config: filepath.Join(dir, "hub", "admin.conf"), log: slog.New(slog.DiscardHandler)}
	if err := b.startHub(); err != nil {
		return err
	}
	defer func() { b.hub.Process.Kill(); b.hub.Wait() }()
	time.Sleep(500 * time.Millisecond) // let the idle hub settle before its baseline
	baseRSS, err := harness.Memory(b.hub.Process.Pid, "VmRSS")
	if err != nil {
		return err
	}

	servicesPerSpoke := nEndpoints / nSpokes / perService
	fmt.Printf("hub federation benchmark: %d spokes, %d endpoints (%d services of %d endpoints per spoke), bbolt store, loopback\n",
		nSpokes, nSpokes*servicesPerSpoke*perService, servicesPerSpoke, perService)
	var all []*spoke.Spoke
	var wg sync.WaitGroup
	start := time.Now()
	for i := range nSpokes {
		s, err := b.spoke(ctx, fmt.Sprintf("site-%d", i), &wg)
		if err != nil {
			return err
		}
		s.Local().Replace(makeServices(i, servicesPerSpoke, perService, 0))
		all = append(all, s)
	}
	total := nSpokes * servicesPerSpoke
	for _, s := range all {
		if err := waitFor(10*time.Minute, func() bool { return s.View().Table().Len() >= total-servicesPerSpoke+nSpokes }); err != nil {
			return fmt.Errorf("load: %w", err)
		}
	}
	fmt.Printf("loaded the federation in %.1fs\n", time.Since(start).Seconds())

	lat, err := propagation(all, servicesPerSpoke, perService, rate, nChanges)
	if err != nil {
		return err
	}
	slices.Sort(lat)
	p50, p99 := pct(lat, 50), pct(lat, 99)
	fmt.Printf("propagation of one endpoint change to %d other spokes at %d changes/s (%d samples): p50 %.1f ms, p99 %.1f ms; target p99 <= 100 ms: %s (%.2fx of target)\n",
		nSpokes-1, rate, len(lat), ms(p50), ms(p99), verdict(ms(p99) <= 100), ms(p99)/100)

	start = time.Now()
	s, err := b.spoke(ctx, "newcomer", &wg)
	if err != nil {
		return err
	}
	if err := waitFor(10*time.Minute, func() bool { return s.View().Synced() && s.View().Table().Len() >= total+nSpokes }); err != nil {
		return fmt.Errorf("initial sync: %w", err)
	}
	fmt.Printf("initial sync of a new spoke (%d services, %d endpoints): %.2fs\n", total, total*perService, time.Since(start).Seconds())

	// Right after the sync the hub's RSS still holds the garbage of it
	// until Go's collector and scavenger get to it: what the catalog costs
	// is the RSS once it has stopped changing.
	justSynced, err := harness.Memory(b.hub.Process.Pid, "VmRSS")
	if err != nil {
		return err
	}
	loaded, settled := justSynced, time.Now()
	for time.Since(settled) < 2*time.Second && time.Since(start) < 30*time.Second {
		time.Sleep(250 * time.Millisecond)
		if now, _ := harness.Memory(b.hub.Process.Pid, "VmRSS"); now != loaded {
			loaded, settled = now, time.Now()
		}
	}
	peak, _ := harness.Memory(b.hub.Process.Pid, "VmHWM")
	perEP := float64(loaded-baseRSS) / float64(total*perService)
	fmt.Printf("hub RSS: %.1f MiB idle, %.1f MiB with the catalog (%.1f MiB right after the sync, %.1f MiB at the run's peak): %.0f bytes per endpoint; target <= 1024: %s (%.2fx of target)\n",
		mib(baseRSS), mib(loaded), mib(justSynced), mib(peak), perEP, verdict(perEP <= 1024), perEP/1024)
	cancel()
	wg.Wait()
	return nil
}

func (b *bench) startHub() error {
	b.hubAddr = freeAddr()
	b.hub = exec.Command(b.bin, "hub", "--data-dir", filepath.Join(b.dir, "hub"), "--listen", b.hubAddr, "--http-listen", "-", "--log-level", "warn")
	b.hub.Stderr = os.Stderr
	b.hub.SysProcAttr = harness.ProcAttr()
	if err := b.hub.Start(); err != nil {
		return fmt.Errorf("start hub %s: %w (run `make build` first)", b.bin, err)
	}
	return waitFor(20*time.Second, func() bool { _, err := os.Stat(b.config); return err == nil })
}

func (b *bench) cli(args ...string) (string, error) {
	return harness.Run(b.bin, append([]string{"--config", b.config}, args...)...)
}

// spoke registers site and runs an in-process spoke for it.
func (b *bench) spoke(ctx context.Context, site string, wg *sync.WaitGroup) (*spoke.Spoke, error) {
	if _, err := b.cli("site", "add", site, "--kind", "docker", "--region", "bench", "--zone", site); err != nil {
		return nil, err
	}
	token, err := b.cli("site", "token", "create", "--site", site)
	if err != nil {
		return nil, err
	}
	o := spoke.DefaultOptions()
	o.Site, o.Hub, o.Token, o.DataDir = site, b.hubAddr, strings.TrimSpace(token), filepath.Join(b.dir, site)
	o.HTTPListen, o.IdentityListen, o.XDSListen, o.Logger = "-", "-", "-", b.log
	s, err := spoke.New(ctx, o)
	if err != nil {
		return nil, err
	}
	wg.Add(1)
	go func() { defer wg.Done(); s.Run(ctx) }()
	return s, nil
}

func makeServices(site, n, perService, rev int) []catalog.Service {
	out := make([]catalog.Service, n)
	for i := range out {
		out[i] = makeService(site, i, perService, rev)
	}
	return out
}

func makeService(site, i, perService, rev int) catalog.Service {
	s := catalog.Service{Namespace: "bench", Name: fmt.Sprintf("svc-%d", i), Ports: []catalog.Port{{Name: "http", Port: 8080}}}
	for e := range perService {
		ep := catalog.Endpoint{
			Address: fmt.Sprintf("10.%d.%d.%d", site, i%250, e%250), Port: 8080,
			Zone: fmt.Sprintf("zone-%d", e%3), Labels: map[string]string{"version": "v1"},
			Identity: fmt.Sprintf("spiffe://site-%d.meshfed/ns/bench/sa/svc-%d", site, i),
		}
		if e == 0 {
			ep.Labels = map[string]string{"version": "v1", "rev": strconv.Itoa(rev)}
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	return s
}

// propagation changes one endpoint at rate per second, round robin over the
// spokes and their services, and measures when each other spoke has it.
func propagation(all []*spoke.Spoke, services, perService, rate, n int) ([]time.Duration, error) {
	type change struct {
		at   time.Time
		seen int
	}
	var mu sync.Mutex
	sent := map[string]*change{} // key@rev → change
	var lat []time.Duration
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, s := range all {
		sub := s.View().Table().Subscribe(func(k string) bool { return strings.HasPrefix(k, "svc/") })
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer sub.Close()
			sub.Take(1 << 30) // what is there already
			for {
				select {
				case <-done:
					return
				case <-sub.C():
				}
				keys, _ := sub.Take(1 << 30)
				now := time.Now()
				for _, k := range keys {
					r, ok := s.View().Table().Get(k)
					if !ok {
						continue
					}
					id := k + "@" + r.GetService().GetEndpoints()[0].GetLabels()["rev"]
					mu.Lock()
					if c := sent[id]; c != nil {
						lat = append(lat, now.Sub(c.at))
						c.seen++
					}
					mu.Unlock()
				}
			}
		}()
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	for i := range n {
		<-tick.C
		site := i % len(all)
		svc := (i / len(all)) % services
		rev := i + 1
		key := federation.ServiceKey(fmt.Sprintf("site-%d", site), "bench", fmt.Sprintf("svc-%d", svc))
		mu.Lock()
		sent[key+"@"+strconv.Itoa(rev)] = &change{at: time.Now()}
		mu.Unlock()
		all[site].Local().Upsert(makeService(site, svc, perService, rev))
	}
	tick.Stop()
	want := n * (len(all) - 1)
	err := waitFor(60*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(lat) >= want })
	close(done)
	wg.Wait()
	if err != nil {
		return nil, fmt.Errorf("propagation: %d of %d arrivals seen: %w", len(lat), want, err)
	}
	return lat, nil
}

func waitFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

func freeAddr() string {
	l, err := netListen()
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[min(len(d)-1, len(d)*p/100)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
func mib(b int64) float64        { return float64(b) / (1 << 20) }

func verdict(ok bool) string {
	if ok {
		return "MET"
	}
	return "NOT MET"
}
