// Package mcsimport writes the federated view into a Kubernetes site the
// way the Multi-Cluster Services API describes it: for every federated
// service whose namespace exists in the cluster, a ServiceImport and one
// EndpointSlice per remote site (labelled multicluster.kubernetes.io/
// service-name and managed-by meshfed) whose endpoints are that site's
// east-west gateway addresses, ready while the site has a healthy endpoint.
// The ServiceImport's ClusterSetIP (spec.ips) is the cluster IP of a
// selectorless Service meshfed-<name> that the slices also belong to, so
// kube-proxy routes the VIP to the gateways and a multicluster DNS server
// (CoreDNS's multicluster plugin) answers <name>.<ns>.svc.clusterset.local
// with it. It also sets the MCS conditions on the cluster's own
// ServiceExports.
package mcsimport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/spoke"
	"github.com/meshfed/meshfed/spoke/kube"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

// LabelSourceSite names the site an imported EndpointSlice stands for.
const LabelSourceSite = "multicluster.kubernetes.io/source-cluster"

var managed = map[string]string{discoveryv1.LabelManagedBy: kube.ManagedBy}

// Options configures an Importer.
type Options struct {
	Client kubernetes.Interface
	MCS    mcsclient.Interface
	Logger *slog.Logger
}

// Importer keeps ServiceImports and EndpointSlices in step with the view.
type Importer struct {
	o          Options
	queue      workqueue.TypedRateLimitingInterface[string]
	namespaces corelisters.NamespaceLister
}

var _ spoke.Importer = (*Importer)(nil)

// New returns an Importer.
func New(o Options) *Importer {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Importer{o: o}
}

// Run reconciles every federated service when it changes in view, and
// every service of this site when it changes in local (for conflicts),
// until ctx ends.
func (im *Importer) Run(ctx context.Context, site string, view *spoke.View, local *spoke.Local) error {
	im.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer im.queue.ShutDown()
	// Namespaces come from an informer: a new namespace imports what the
	// federation has for it.
	nsf := informers.NewSharedInformerFactoryWithOptions(im.o.Client, 0)
	nsInf := nsf.Core().V1().Namespaces()
	im.namespaces = nsInf.Lister()
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: func(any) { im.enqueueAll(view) }}); err != nil {
		return err
	}
	nsf.Start(ctx.Done())
	defer nsf.Shutdown()
	nsf.WaitForCacheSync(ctx.Done())
	watch := func(t *federation.Table) {
		sub := t.Subscribe(func(k string) bool { return strings.HasPrefix(k, "svc/") || strings.HasPrefix(k, "site/") })
		go func() {
			defer sub.Close()
			for {
				select {
				case <-ctx.Done():
					return
				case <-sub.C():
				}
				keys, _ := sub.Take(1 << 20)
				for _, k := range keys {
					if strings.HasPrefix(k, "site/") {
						im.enqueueAll(view) // gateway addresses or state changed
						continue
					}
					im.queue.Add(serviceID(k))
				}
			}
		}()
	}
	watch(view.Table())
	watch(local.Table())
	go func() {
		<-ctx.Done()
		im.queue.ShutDown()
	}()
	// Each reconcile waits on a few API round trips; several workers keep
	// up with a busy federation. The queue never gives one key to two.
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				key, quit := im.queue.Get()
				if quit {
					return
				}
				ns, name, _ := strings.Cut(key, "/")
				if err := im.reconcile(ctx, site, view, local, ns, name); err != nil {
					im.o.Logger.Warn("could not import a federated service; retrying", "service", key, "err", err)
					im.queue.AddRateLimited(key)
				} else {
					im.queue.Forget(key)
				}
				im.queue.Done(key)
			}
		}()
	}
	wg.Wait()
	return nil
}

// workers is how many services are reconciled at once.
const workers = 4

func (im *Importer) enqueueAll(view *spoke.View) {
	for k := range view.Table().Versions("svc/") {
		im.queue.Add(serviceID(k))
	}
}

// serviceID is the namespace/name of a service key svc/<site>/<ns>/<name>.
func serviceID(key string) string {
	parts := strings.SplitN(key, "/", 4)
	return parts[2] + "/" + parts[3]
}

// reconcile makes the cluster's import of ns/name match the view.
func (im *Importer) reconcile(ctx context.Context, site string, view *spoke.View, local *spoke.Local, ns, name string) error {
	// Each site's copy by key: the view may hold thousands of services.
	var remote []*meshfedv1.Service
	for key := range view.Table().Versions("site/") {
		other := strings.TrimPrefix(key, "site/")
		if other == site {
			continue
		}
		if r, ok := view.Table().Get(federation.ServiceKey(other, ns, name)); ok {
			remote = append(remote, r.GetService())
		}
	}
	sort.Slice(remote, func(i, j int) bool { return remote[i].GetSite() < remote[j].GetSite() })
	if _, exported := local.Table().Get(federation.ServiceKey(site, ns, name)); exported {
		if err := im.exportConditions(ctx, site, local, remote, ns, name); err != nil {
			return err
		}
	}
	if _, err := im.namespaces.Get(ns); apierrors.IsNotFound(err) {
		return nil // namespace sameness: only namespaces this cluster has
	} else if err != nil {
		return err
	}
	if len(remote) == 0 {
		return im.withdraw(ctx, ns, name)
	}
	ports := importPorts(remote)
	cur, err := im.o.MCS.MulticlusterV1alpha1().ServiceImports(ns).Get(ctx, name, metav1.GetOptions{})
	fresh := apierrors.IsNotFound(err)
	if err != nil && !fresh {
		return err
	}
	if fresh {
		cur = nil
	}
	// A new import's derived Service and EndpointSlices are most likely
	// new too: they are created without reading first (what exists after
	// all is read and updated then). That is 5 API calls for a new import
	// instead of 7, what a large first import is made of.
	//
	// Without its ClusterSetIP (the cluster's service range may be full),
	// the import and its endpoints are still written; the IP is retried.
	vip, derr := im.applyDerived(ctx, ns, name, ports, fresh)
	if derr != nil {
		derr = fmt.Errorf("the ClusterSetIP of %s/%s (Service %s): %w", ns, name, DerivedServiceName(name), derr)
	}
	if err := im.applyImport(ctx, ns, name, cur, remote, ports, vip); err != nil {
		return errors.Join(err, derr)
	}
	return errors.Join(im.applySlices(ctx, view, ns, name, remote, fresh), derr)
}

// importPorts are the union of the remote sites' ports, sorted.
func importPorts(remote []*meshfedv1.Service) []mcsv1a1.ServicePort {
	ports := map[string]mcsv1a1.ServicePort{}
	for _, s := range remote {
		for _, p := range s.GetPorts() {
			ports[p.GetName()+"/"+p.GetProtocol()] = mcsv1a1.ServicePort{Name: p.GetName(), Port: int32(p.GetPort()), Protocol: corev1.Protocol(p.GetProtocol())}
		}
	}
	out := make([]mcsv1a1.ServicePort, 0, len(ports))
	for _, k := range sortedKeys(ports) {
		out = append(out, ports[k])
	}
	return out
}

// DerivedServiceName is the selectorless Service whose cluster IP is an
// import's ClusterSetIP.
func DerivedServiceName(name string) string {
	n := "meshfed-" + name
	if len(n) > 63 {
		n = n[:63]
	}
	return strings.TrimRight(n, "-")
}

// applyDerived keeps the import's derived Service (the cluster allocates
// its IP) and returns that IP. create: try creating it before reading it.
func (im *Importer) applyDerived(ctx context.Context, ns, name string, ports []mcsv1a1.ServicePort, create bool) (string, error) {
	svcs := im.o.Client.CoreV1().Services(ns)
	want := corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP}
	for _, p := range ports {
		want.Ports = append(want.Ports, corev1.ServicePort{Name: p.Name, Port: p.Port, Protocol: p.Protocol, TargetPort: intstr.FromInt32(p.Port)})
	}
	dn := DerivedServiceName(name)
	createIt := func() (string, error) {
		cur, err := svcs.Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: dn, Namespace: ns, Labels: map[string]string{discoveryv1.LabelManagedBy: kube.ManagedBy, mcsv1a1.LabelServiceName: name}},
			Spec:       want,
		}, metav1.CreateOptions{})
		if err != nil {
			return "", err
		}
		return cur.Spec.ClusterIP, nil
	}
	if create {
		if vip, err := createIt(); !apierrors.IsAlreadyExists(err) {
			return vip, err
		}
	}
	cur, err := svcs.Get(ctx, dn, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return createIt()
	}
	if err != nil {
		return "", err
	}
	if cur.Labels[discoveryv1.LabelManagedBy] != kube.ManagedBy {
		return "", fmt.Errorf("Service %s/%s exists and is not meshfed's: rename it, meshfed derives the ClusterSetIP of %s from it", ns, dn, name)
	}
	if !equality.Semantic.DeepEqual(portsOf(cur.Spec.Ports), portsOf(want.Ports)) {
		cur.Spec.Ports = want.Ports
		if cur, err = svcs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return "", err
		}
	}
	return cur.Spec.ClusterIP, nil
}

// portsOf drops what the server fills in (node ports, defaults).
func portsOf(ps []corev1.ServicePort) []corev1.ServicePort {
	out := make([]corev1.ServicePort, len(ps))
	for i, p := range ps {
		out[i] = corev1.ServicePort{Name: p.Name, Port: p.Port, Protocol: p.Protocol, TargetPort: p.TargetPort}
	}
	return out
}

// applyImport writes the ServiceImport; cur is the one in the cluster, nil
// when there is none.
func (im *Importer) applyImport(ctx context.Context, ns, name string, cur *mcsv1a1.ServiceImport, remote []*meshfedv1.Service, ports []mcsv1a1.ServicePort, vip string) error {
	var clusters []mcsv1a1.ClusterStatus
	for _, s := range remote {
		clusters = append(clusters, mcsv1a1.ClusterStatus{Cluster: s.GetSite()})
	}
	spec := mcsv1a1.ServiceImportSpec{Type: mcsv1a1.ClusterSetIP, Ports: ports}
	if vip != "" && vip != corev1.ClusterIPNone {
		spec.IPs = []string{vip}
	}
	imports := im.o.MCS.MulticlusterV1alpha1().ServiceImports(ns)
	var err error
	if cur == nil {
		cur, err = imports.Create(ctx, &mcsv1a1.ServiceImport{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managed}, Spec: spec}, metav1.CreateOptions{})
	} else {
		if cur.Labels[discoveryv1.LabelManagedBy] != kube.ManagedBy {
			return fmt.Errorf("ServiceImport %s/%s exists and is not meshfed's: leaving it alone", ns, name)
		}
		if equality.Semantic.DeepEqual(cur.Spec, spec) && equality.Semantic.DeepEqual(cur.Status.Clusters, clusters) {
			return nil // unchanged: no write
		}
		if !equality.Semantic.DeepEqual(cur.Spec, spec) {
			cur.Spec = spec
			cur, err = imports.Update(ctx, cur, metav1.UpdateOptions{})
		}
	}
	if err != nil {
		return err
	}
	cur.Status.Clusters = clusters
	_, err = imports.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	return err
}

// applySlices writes one EndpointSlice per remote site and deletes those of
// sites that no longer export the service. create: try creating them
// before listing what exists.
func (im *Importer) applySlices(ctx context.Context, view *spoke.View, ns, name string, remote []*meshfedv1.Service, create bool) error {
	slices := im.o.Client.DiscoveryV1().EndpointSlices(ns)
	want := map[string]*discoveryv1.EndpointSlice{}
	for _, s := range remote {
		es := im.slice(view, ns, name, s)
		if es != nil {
			want[es.Name] = es
		}
	}
	if create {
		created := 0
		for _, es := range want {
			if _, err := slices.Create(ctx, es, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
				break
			} else if err != nil {
				return err
			}
			created++
		}
		if created == len(want) {
			return nil
		}
	}
	existing, err := slices.List(ctx, metav1.ListOptions{LabelSelector: selector(name)})
	if err != nil {
		return err
	}
	for i := range existing.Items {
		cur := &existing.Items[i]
		w, ok := want[cur.Name]
		if !ok {
			if err := slices.Delete(ctx, cur.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			continue
		}
		delete(want, cur.Name)
		if equality.Semantic.DeepEqual(cur.Labels, w.Labels) && cur.AddressType == w.AddressType &&
			equality.Semantic.DeepEqual(cur.Endpoints, w.Endpoints) && equality.Semantic.DeepEqual(cur.Ports, w.Ports) {
			continue
		}
		cur.Labels, cur.AddressType, cur.Endpoints, cur.Ports = w.Labels, w.AddressType, w.Endpoints, w.Ports
		if _, err := slices.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	// One site's slice blocked by an object meshfed did not make (the list
	// above only finds meshfed's) does not hold back the other sites'.
	var errs []error
	for _, es := range want {
		_, err := slices.Create(ctx, es, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			err = fmt.Errorf("EndpointSlice %s/%s exists and is not meshfed's (no label %s=%s): delete or rename it, meshfed imports site %s's endpoints of %s there",
				ns, es.Name, discoveryv1.LabelManagedBy, kube.ManagedBy, es.Labels[LabelSourceSite], name)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// slice is the EndpointSlice of one remote site's copy of a service: its
// gateway addresses, ready while the site has a healthy endpoint of it.
func (im *Importer) slice(view *spoke.View, ns, name string, s *meshfedv1.Service) *discoveryv1.EndpointSlice {
	sr, ok := view.Table().Get(federation.SiteKey(s.GetSite()))
	if !ok || len(sr.GetSite().GetGatewayAddresses()) == 0 {
		im.o.Logger.Warn("a remote site has no gateway address; its endpoints are not imported", "site", s.GetSite(), "service", ns+"/"+name)
		return nil
	}
	healthy := false
	for _, e := range s.GetEndpoints() {
		if e.GetHealth() == meshfedv1.Health_HEALTH_HEALTHY {
			healthy = true
		}
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: name + "-" + s.GetSite() + "-meshfed", Namespace: ns,
			Labels: map[string]string{
				mcsv1a1.LabelServiceName: name, discoveryv1.LabelManagedBy: kube.ManagedBy, LabelSourceSite: s.GetSite(),
				// The derived Service's too, so kube-proxy routes its IP here.
				discoveryv1.LabelServiceName: DerivedServiceName(name),
			},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	var gwPort int32
	for _, g := range sr.GetSite().GetGatewayAddresses() {
		host, port, err := net.SplitHostPort(g)
		if err != nil {
			continue
		}
		p, _ := strconv.Atoi(port)
		gwPort = int32(p)
		ip := net.ParseIP(host)
		if ip != nil && ip.IsLoopback() {
			im.o.Logger.Warn("skipping a loopback gateway address: Kubernetes refuses loopback endpoints; register the site with an address this cluster reaches", "site", s.GetSite(), "gateway", g)
			continue
		}
		if ip == nil {
			es.AddressType = discoveryv1.AddressTypeFQDN
		} else if ip.To4() == nil {
			es.AddressType = discoveryv1.AddressTypeIPv6
		}
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{host}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(healthy)}})
	}
	if len(es.Endpoints) == 0 {
		return nil
	}
	// Every port of the service is reached through the gateway's one port;
	// the gateway tells them apart by SNI.
	for _, p := range s.GetPorts() {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptr.To(p.GetName()), Port: ptr.To(gwPort), Protocol: ptr.To(corev1.Protocol(p.GetProtocol()))})
	}
	return es
}

func selector(name string) string {
	return labels.SelectorFromSet(labels.Set{mcsv1a1.LabelServiceName: name, discoveryv1.LabelManagedBy: kube.ManagedBy}).String()
}

// withdraw deletes meshfed's ServiceImport and EndpointSlices of ns/name.
func (im *Importer) withdraw(ctx context.Context, ns, name string) error {
	imports := im.o.MCS.MulticlusterV1alpha1().ServiceImports(ns)
	if cur, err := imports.Get(ctx, name, metav1.GetOptions{}); err == nil && cur.Labels[discoveryv1.LabelManagedBy] == kube.ManagedBy {
		if err := imports.Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	} else if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	svcs := im.o.Client.CoreV1().Services(ns)
	if cur, err := svcs.Get(ctx, DerivedServiceName(name), metav1.GetOptions{}); err == nil && cur.Labels[discoveryv1.LabelManagedBy] == kube.ManagedBy {
		if err := svcs.Delete(ctx, cur.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	} else if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return im.o.Client.DiscoveryV1().EndpointSlices(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{LabelSelector: selector(name)})
}

// exportConditions sets Valid and Conflict on this cluster's ServiceExport
// of ns/name: Conflict when another site exports it with other ports or
// protocols (the MCS spec's port conflict).
func (im *Importer) exportConditions(ctx context.Context, site string, local *spoke.Local, remote []*meshfedv1.Service, ns, name string) error {
	exports := im.o.MCS.MulticlusterV1alpha1().ServiceExports(ns)
	cur, err := exports.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	own, published := local.Table().Get(federation.ServiceKey(site, ns, name))
	valid := metav1.Condition{Type: string(mcsv1a1.ServiceExportValid), Status: metav1.ConditionTrue, Reason: "Exported", Message: "the service is federated"}
	if !published {
		valid = metav1.Condition{Type: string(mcsv1a1.ServiceExportValid), Status: metav1.ConditionFalse, Reason: "ServiceNotFound", Message: "no Service " + name + " in namespace " + ns}
	}
	conflict := metav1.Condition{Type: string(mcsv1a1.ServiceExportConflict), Status: metav1.ConditionFalse, Reason: "NoConflict", Message: "every site agrees on ports and protocols"}
	if published {
		mine := portSet(own.GetService())
		var others []string
		for _, r := range remote {
			if portSet(r) != mine {
				others = append(others, r.GetSite()+" exports "+portSet(r))
			}
		}
		if len(others) > 0 {
			sort.Strings(others)
			conflict = metav1.Condition{Type: string(mcsv1a1.ServiceExportConflict), Status: metav1.ConditionTrue, Reason: "PortConflict",
				Message: "this cluster exports " + mine + "; " + strings.Join(others, "; ")}
		}
	}
	changed := false
	for _, c := range []metav1.Condition{valid, conflict} {
		changed = setCondition(&cur.Status.Conditions, c, cur.Generation) || changed
	}
	if !changed {
		return nil
	}
	_, err = exports.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	return err
}

func portSet(s *meshfedv1.Service) string {
	var ps []string
	for _, p := range s.GetPorts() {
		ps = append(ps, fmt.Sprintf("%s:%d/%s", p.GetName(), p.GetPort(), p.GetProtocol()))
	}
	sort.Strings(ps)
	return "[" + strings.Join(ps, " ") + "]"
}

// setCondition sets c in conds, keeping the transition time when only the
// message changes; it reports whether anything changed.
func setCondition(conds *[]metav1.Condition, c metav1.Condition, gen int64) bool {
	c.ObservedGeneration = gen
	for i, old := range *conds {
		if old.Type != c.Type {
			continue
		}
		if old.Status == c.Status && old.Reason == c.Reason && old.Message == c.Message {
			return false
		}
		c.LastTransitionTime = old.LastTransitionTime
		if old.Status != c.Status {
			c.LastTransitionTime = metav1.Now()
		}
		(*conds)[i] = c
		return true
	}
	c.LastTransitionTime = metav1.Now()
	*conds = append(*conds, c)
	return true
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
