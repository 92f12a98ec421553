// Package mcsexport feeds a Kubernetes site's spoke: client-go informers on
// Services, EndpointSlices, Pods, Nodes and MCS ServiceExports turn every
// exported Service into a catalog service. Changes are handled per service
// through a work queue, so an update recomputes one service, never the
// cluster.
package mcsexport

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke"
	"github.com/meshfed/meshfed/spoke/kube"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"
	mcslisters "sigs.k8s.io/mcs-api/pkg/client/listers/apis/v1alpha1"
)

var _ spoke.Source = (*Source)(nil)

// Options configures a Source.
type Options struct {
	Client kubernetes.Interface
	MCS    mcsclient.Interface
	Logger *slog.Logger
	// HealthEvery is how often the API server is probed. Default 2s.
	HealthEvery time.Duration
}

// Source is a cluster's exported services.
type Source struct {
	o         Options
	services  corelisters.ServiceLister
	slices    discoverylisters.EndpointSliceLister
	pods      corelisters.PodLister
	nodes     corelisters.NodeLister
	exports   mcslisters.ServiceExportLister
	td        spiffeid.TrustDomain
	queue     workqueue.TypedRateLimitingInterface[string]
	published map[string]bool
}

// New returns a Source.
func New(o Options) *Source {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.HealthEvery == 0 {
		o.HealthEvery = 2 * time.Second
	}
	return &Source{o: o, published: map[string]bool{}}
}

// Run watches the cluster and keeps local in step until ctx ends. It syncs
// the informers' caches before it publishes anything.
func (s *Source) Run(ctx context.Context, local *spoke.Local) error {
	// Workload identities: spiffe://<site td>/ns/<namespace>/sa/<name>.
	s.td = local.TrustDomain()
	// Health first: a cluster that is down or refuses the credential never
	// syncs, and the hub should hear why.
	go s.probe(ctx, local)
	core := informers.NewSharedInformerFactory(s.o.Client, 0)
	mcs := mcsinformers.NewSharedInformerFactory(s.o.MCS, 0)
	s.services = core.Core().V1().Services().Lister()
	s.slices = core.Discovery().V1().EndpointSlices().Lister()
	s.pods = core.Core().V1().Pods().Lister()
	s.nodes = core.Core().V1().Nodes().Lister()
	s.exports = mcs.Multicluster().V1alpha1().ServiceExports().Lister()
	s.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer s.queue.ShutDown()

	byKey := cache.ResourceEventHandlerFuncs{AddFunc: s.enqueue, UpdateFunc: func(_, o any) { s.enqueue(o) }, DeleteFunc: s.enqueue}
	bySlice := cache.ResourceEventHandlerFuncs{AddFunc: s.enqueueSlice, UpdateFunc: func(_, o any) { s.enqueueSlice(o) }, DeleteFunc: s.enqueueSlice}
	for _, inf := range []cache.SharedIndexInformer{core.Core().V1().Services().Informer(), mcs.Multicluster().V1alpha1().ServiceExports().Informer()} {
		if _, err := inf.AddEventHandler(byKey); err != nil {
			return err
		}
	}
	if _, err := core.Discovery().V1().EndpointSlices().Informer().AddEventHandler(bySlice); err != nil {
		return err
	}
	core.Core().V1().Pods().Informer()
	core.Core().V1().Nodes().Informer()
	core.Start(ctx.Done())
	mcs.Start(ctx.Done())
	defer core.Shutdown()
	defer mcs.Shutdown()
	for typ, ok := range core.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("mcsexport: %v informer did not sync", typ)
		}
	}
	for typ, ok := range mcs.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("mcsexport: %v informer did not sync", typ)
		}
	}
	s.o.Logger.Info("kubernetes caches synced")
	go func() {
		<-ctx.Done()
		s.queue.ShutDown()
	}()
	for {
		key, quit := s.queue.Get()
		if quit {
			return nil
		}
		if err := s.sync(local, key); err != nil {
			s.o.Logger.Warn("could not publish a service; retrying", "service", key, "err", err)
			s.queue.AddRateLimited(key)
		} else {
			s.queue.Forget(key)
		}
		s.queue.Done(key)
	}
}

// probe reports the API server's health to the hub through local. While
// it is unhealthy the informers keep their last state and retry by
// themselves, so the site goes on exporting what it had.
func (s *Source) probe(ctx context.Context, local *spoke.Local) {
	last := ""
	for {
		cctx, cancel := context.WithTimeout(ctx, s.o.HealthEvery)
		_, err := s.o.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(cctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		healthy, msg := true, "ok"
		switch {
		case apierrors.IsUnauthorized(err) || apierrors.IsForbidden(err):
			healthy, msg = false, "the cluster refuses the spoke's credential ("+err.Error()+"): register the cluster again or restore the spoke's ServiceAccount"
		case err != nil:
			healthy, msg = false, "the Kubernetes API is unreachable ("+err.Error()+"); exporting the last known state"
		}
		if msg != last {
			if healthy {
				s.o.Logger.Info("the Kubernetes API is reachable")
			} else {
				s.o.Logger.Warn("the Kubernetes API is unhealthy", "err", msg)
			}
			last = msg
		}
		local.SetSourceStatus(healthy, msg)
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.o.HealthEvery):
		}
	}
}

func (s *Source) enqueue(obj any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
		s.queue.Add(key)
	}
}

func (s *Source) enqueueSlice(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok || es.Labels[discoveryv1.LabelManagedBy] == kube.ManagedBy {
		return
	}
	if svc := es.Labels[discoveryv1.LabelServiceName]; svc != "" {
		s.queue.Add(es.Namespace + "/" + svc)
	}
}

// sync publishes or withdraws one service.
func (s *Source) sync(local *spoke.Local, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	svc, err := s.build(ns, name)
	if err != nil {
		return err
	}
	if svc == nil {
		if s.published[key] {
			local.Remove(ns, name)
			delete(s.published, key)
		}
		return nil
	}
	local.Upsert(*svc)
	s.published[key] = true
	return nil
}

// build is the catalog service of an exported Service, or nil when the
// Service is not exported or does not exist.
func (s *Source) build(ns, name string) (*catalog.Service, error) {
	if _, err := s.exports.ServiceExports(ns).Get(name); apierrors.IsNotFound(err) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	ksvc, err := s.services.Services(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	out := &catalog.Service{Namespace: ns, Name: name}
	for _, p := range ksvc.Spec.Ports {
		out.Ports = append(out.Ports, catalog.Port{Name: p.Name, Port: uint32(p.Port), Protocol: string(p.Protocol)})
	}
	slices, err := s.slices.EndpointSlices(ns).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name}))
	if err != nil {
		return nil, err
	}
	sort.Slice(slices, func(i, j int) bool { return slices[i].Name < slices[j].Name })
	for _, es := range slices {
		if es.Labels[discoveryv1.LabelManagedBy] == kube.ManagedBy || es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		for _, ep := range es.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			base := s.endpoint(ns, ep)
			for _, p := range es.Ports {
				if p.Port == nil {
					continue
				}
				e := base
				e.Port = uint32(*p.Port)
				if p.Name != nil {
					e.PortName = *p.Name
				}
				out.Endpoints = append(out.Endpoints, e)
			}
		}
	}
	if err := catalog.ValidateService(*out); err != nil {
		return nil, fmt.Errorf("mcsexport: %s/%s: %w", ns, name, err)
	}
	return out, nil
}

// endpoint maps one EndpointSlice endpoint: its zone from the slice or its
// node, health from its conditions, identity from its pod's ServiceAccount.
func (s *Source) endpoint(ns string, ep discoveryv1.Endpoint) catalog.Endpoint {
	e := catalog.Endpoint{Address: ep.Addresses[0], Health: health(ep.Conditions)}
	if ep.Zone != nil {
		e.Zone = *ep.Zone
	}
	if ep.NodeName != nil {
		if node, err := s.nodes.Get(*ep.NodeName); err == nil {
			e.Region = node.Labels[corev1.LabelTopologyRegion]
			if e.Zone == "" {
				e.Zone = node.Labels[corev1.LabelTopologyZone]
			}
		}
	}
	if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
		if pod, err := s.pods.Pods(ns).Get(ref.Name); err == nil {
			sa := pod.Spec.ServiceAccountName
			if sa == "" {
				sa = "default"
			}
			if id, err := spiffeid.FromSegments(s.td, "ns", ns, "sa", sa); err == nil {
				e.Identity = id.String()
			}
			if v := pod.Labels["version"]; v != "" {
				e.Labels = map[string]string{"version": v}
			} else if v := pod.Labels["app.kubernetes.io/version"]; v != "" {
				e.Labels = map[string]string{"version": v}
			}
		}
	}
	return e
}

func health(c discoveryv1.EndpointConditions) string {
	switch {
	case c.Ready == nil || *c.Ready:
		return catalog.HealthHealthy
	case c.Terminating != nil && *c.Terminating:
		return catalog.HealthDraining
	}
	return catalog.HealthUnhealthy
}
