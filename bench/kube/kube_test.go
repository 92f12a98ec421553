// Package kube benchmarks a Kubernetes site end to end on real parts: two
// kube-apiservers on one etcd, the hub and two spokes (the built binary).
// `make bench` runs it once; `go test` alone runs no benchmark.
package kube

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

// TestMain removes the binaries the benchmark built.
func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

const (
	services    = 5000
	perService  = 10
	changes     = 200
	changesPerS = 20
)

func fast(k *harness.Kube) (kubernetes.Interface, mcsclient.Interface) {
	cfg := rest.CopyConfig(k.Config)
	cfg.QPS, cfg.Burst = 1000, 2000
	return kubernetes.NewForConfigOrDie(cfg), mcsclient.NewForConfigOrDie(cfg)
}

func slice(i int, ready bool) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d-1", i), Labels: map[string]string{discoveryv1.LabelServiceName: fmt.Sprintf("svc-%d", i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080)}},
	}
	for e := range perService {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", i/250, i%250, e+1)}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(ready)}, Zone: ptr.To("zone-a")})
	}
	return es
}

// parallel runs fn for 0..n-1 on 16 workers and returns the first error.
func parallel(n int, fn func(i int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	next := make(chan int)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

func BenchmarkKubernetesSite(b *testing.B) {
	for b.Loop() {
		run(b)
	}
}

func run(b *testing.B) {
	ctx := context.Background()
	etcd := harness.Etcd(b)
	a, bb := harness.KubeAPIServer(b, etcd, "a"), harness.KubeAPIServer(b, etcd, "b")
	root, _ := filepath.Abs("../..")
	ca, ma := fast(a)
	cb, _ := fast(bb)
	for _, k := range []*harness.Kube{a, bb} {
		k.ApplyFile(b, filepath.Join(root, "deploy", "kubernetes", "mcs-crds.yaml"))
		if _, err := k.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	start := time.Now()
	err := parallel(services, func(i int) error {
		name := fmt.Sprintf("svc-%d", i)
		if _, err := ca.CoreV1().Services("bench").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}, metav1.CreateOptions{}); err != nil {
			return err
		}
		if _, err := ca.DiscoveryV1().EndpointSlices("bench").Create(ctx, slice(i, true), metav1.CreateOptions{}); err != nil {
			return err
		}
		_, err := ma.MulticlusterV1alpha1().ServiceExports("bench").Create(ctx, &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	fmt.Printf("kubernetes site benchmark: %d exported services, %d endpoints in cluster a (created in %.0fs)\n", services, services*perService, time.Since(start).Seconds())

	bin := harness.Binary(b)
	dir := b.TempDir()
	hubAddr, hubHTTP := harness.FreePort(b), harness.FreePort(b)
	harness.Start(b, "hub", bin, "hub", "--data-dir", filepath.Join(dir, "hub"), "--listen", hubAddr, "--http-listen", hubHTTP, "--log-level", "warn")
	harness.WaitReady(b, hubHTTP, 30*time.Second)
	cli := func(args ...string) string {
		out, err := harness.Run(bin, append([]string{"--config", filepath.Join(dir, "hub", "admin.conf")}, args...)...)
		if err != nil {
			b.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	spoke := func(site string, k *harness.Kube) *harness.Process {
		cli("site", "add", site, "--kind", "kubernetes", "--region", "bench", "--zone", site, "--gateway-address", "gw-"+site+".meshfed.test:15443")
		token := cli("site", "token", "create", "--site", site)
		return harness.Start(b, "spoke-"+site, bin, "spoke", "--site", site, "--hub", hubAddr, "--token", token, "--data-dir", filepath.Join(dir, site),
			"--kubeconfig", k.Kubeconfig, "--http-listen", "-", "--identity-listen", "-", "--xds-listen", "-", "--log-level", "warn")
	}
	importer := spoke("b", bb)
	start = time.Now()
	exporter := spoke("a", a)
	harness.Eventually(b, 10*time.Minute, "the hub has every endpoint of a", func() error {
		n, err := harness.Metric(hubHTTP, "meshfed_hub_catalog_endpoints")
		if err != nil || n < services*perService {
			return fmt.Errorf("%v endpoints (%v)", n, err)
		}
		return nil
	})
	syncTime := time.Since(start)
	rss := rssOf(b, exporter.Pid())
	fmt.Printf("initial sync of cluster a (%d services, %d endpoints) to the hub: %.2fs; exporting spoke RSS %.1f MiB\n", services, services*perService, syncTime.Seconds(), float64(rss)/(1<<20))

	harness.Eventually(b, 20*time.Minute, "cluster b imports every service", func() error {
		l, err := cb.DiscoveryV1().EndpointSlices("bench").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelManagedBy + "=meshfed"})
		if err != nil || len(l.Items) < services {
			return fmt.Errorf("%d imported slices (%v)", len(l.Items), err)
		}
		return nil
	})
	fmt.Printf("cluster b imported all %d services %.0fs after a's spoke started; importing spoke RSS %.1f MiB\n", services, time.Since(start).Seconds(), float64(rssOf(b, importer.Pid()))/(1<<20))

	// Propagation: one service at a time turns all its endpoints not ready
	// in a; its imported slice in b turns not ready. An informer watches b
	// (it re-watches by itself if the server closes the watch).
	var mu sync.Mutex
	sent := map[string]time.Time{}
	var lat []time.Duration
	done := make(chan struct{})
	inf := informers.NewSharedInformerFactoryWithOptions(cb, 0, informers.WithNamespace("bench"),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = discoveryv1.LabelManagedBy + "=meshfed" }))
	_, err = inf.Discovery().V1().EndpointSlices().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(_, obj any) {
		es, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok || len(es.Endpoints) == 0 || *es.Endpoints[0].Conditions.Ready {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if at, ok := sent[es.Labels[mcsv1a1.LabelServiceName]]; ok {
			lat = append(lat, time.Since(at))
			delete(sent, es.Labels[mcsv1a1.LabelServiceName])
			if len(lat) == changes {
				close(done)
			}
		}
	}})
	if err != nil {
		b.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	inf.Start(stop)
	inf.WaitForCacheSync(stop)
	tick := time.NewTicker(time.Second / changesPerS)
	for i := range changes {
		<-tick.C
		es, err := ca.DiscoveryV1().EndpointSlices("bench").Get(ctx, fmt.Sprintf("svc-%d-1", i), metav1.GetOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for j := range es.Endpoints {
			es.Endpoints[j].Conditions.Ready = ptr.To(false)
		}
		mu.Lock()
		sent["svc-"+strconv.Itoa(i)] = time.Now()
		mu.Unlock()
		if _, err := ca.DiscoveryV1().EndpointSlices("bench").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	tick.Stop()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		mu.Lock()
		defer mu.Unlock()
		b.Fatalf("only %d of %d changes reached cluster b", len(lat), changes)
	}
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lat)
	p := func(q int) float64 { return float64(lat[min(len(lat)-1, len(lat)*q/100)].Microseconds()) / 1000 }
	fmt.Printf("propagation EndpointSlice in a -> imported EndpointSlice in b at %d changes/s (%d samples): p50 %.1f ms, p99 %.1f ms\n", changesPerS, len(lat), p(50), p(99))
	b.ReportMetric(syncTime.Seconds(), "sync-s")
	b.ReportMetric(p(99), "p99-ms")
}

func rssOf(b *testing.B, pid int) int64 {
	n, err := harness.Memory(pid, "VmRSS")
	if err != nil {
		b.Fatal(err)
	}
	return n
}
