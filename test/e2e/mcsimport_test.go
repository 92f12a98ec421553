package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke/kube/mcsimport"
	"github.com/meshfed/meshfed/test/harness"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

// cluster is a real kube-apiserver with MCS CRDs and a shop namespace.
type cluster struct {
	*harness.Kube
	mcs mcsclient.Interface
}

func newCluster(t *testing.T, etcd, name string) *cluster {
	k := harness.KubeAPIServer(t, etcd, name)
	root, _ := filepath.Abs("../..")
	k.ApplyFile(t, filepath.Join(root, "deploy", "kubernetes", "mcs-crds.yaml"))
	rc, err := clientcmd.BuildConfigFromFlags("", k.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	mcs, err := mcsclient.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return &cluster{Kube: k, mcs: mcs}
}

// export creates Service shop/name with one port, a slice with one ready
// endpoint, and its ServiceExport; it returns the slice.
func (c *cluster) export(t *testing.T, name string, port int32, addr string) *discoveryv1.EndpointSlice {
	t.Helper()
	ctx := context.Background()
	if _, err := c.Client.CoreV1().Services("shop").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: port, Protocol: corev1.ProtocolTCP}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	es, err := c.Client.DiscoveryV1().EndpointSlices("shop").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(port), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.mcs.MulticlusterV1alpha1().ServiceExports("shop").Create(ctx, &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return es
}

func (c *cluster) importedSlices(name string) ([]discoveryv1.EndpointSlice, error) {
	l, err := c.Client.DiscoveryV1().EndpointSlices("shop").List(context.Background(), metav1.ListOptions{LabelSelector: mcsv1a1.LabelServiceName + "=" + name + "," + discoveryv1.LabelManagedBy + "=meshfed"})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

func (c *cluster) condition(name string, typ mcsv1a1.ServiceExportConditionType) (metav1.Condition, error) {
	se, err := c.mcs.MulticlusterV1alpha1().ServiceExports("shop").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return metav1.Condition{}, err
	}
	for _, cond := range se.Status.Conditions {
		if cond.Type == string(typ) {
			return cond, nil
		}
	}
	return metav1.Condition{}, fmt.Errorf("no %s condition yet: %v", typ, se.Status.Conditions)
}

func TestKubernetesImport(t *testing.T) {
	etcd := harness.Etcd(t)
	east, west := newCluster(t, etcd, "east"), newCluster(t, etcd, "west")
	slice := east.export(t, "cart", 80, "10.1.0.5")

	f := newFederation(t)
	f.addSite("east", "z1", "", "--kubeconfig", east.Kubeconfig)
	f.addSite("west", "z2", "", "--kubeconfig", west.Kubeconfig)
	var eastGateway string
	harness.Eventually(t, 10*time.Second, "east's gateway address", func() error {
		out, err := f.cli("site", "show", "east", "-o", "json")
		if err != nil {
			return err
		}
		var s catalog.Site
		if err := json.Unmarshal([]byte(out), &s); err != nil {
			return err
		}
		eastGateway = s.GatewayAddresses[0]
		return nil
	})
	gwHost, gwPortStr, _ := net.SplitHostPort(eastGateway)
	var gwPort int32
	fmt.Sscan(gwPortStr, &gwPort)
	ctx := context.Background()

	t.Run("an export in east becomes a ServiceImport and EndpointSlice in west", func(t *testing.T) {
		harness.Eventually(t, 20*time.Second, "west imports shop/cart", func() error {
			si, err := west.mcs.MulticlusterV1alpha1().ServiceImports("shop").Get(ctx, "cart", metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(si.Spec.Ports) != 1 || si.Spec.Ports[0].Port != 80 || len(si.Status.Clusters) != 1 || si.Status.Clusters[0].Cluster != "east" {
				return fmt.Errorf("ServiceImport %+v %+v", si.Spec, si.Status)
			}
			// The ClusterSetIP is the cluster IP west's apiserver allocated to
			// the derived Service, which the imported slices belong to.
			derived, err := west.Client.CoreV1().Services("shop").Get(ctx, mcsimport.DerivedServiceName("cart"), metav1.GetOptions{})
			if err != nil {
				return err
			}
			if derived.Spec.ClusterIP == "" || len(si.Spec.IPs) != 1 || si.Spec.IPs[0] != derived.Spec.ClusterIP || len(derived.Spec.Selector) != 0 {
				return fmt.Errorf("ServiceImport IPs %v, derived Service %s with IP %q and selector %v", si.Spec.IPs, derived.Name, derived.Spec.ClusterIP, derived.Spec.Selector)
			}
			slices, err := west.importedSlices("cart")
			if err != nil || len(slices) != 1 {
				return fmt.Errorf("%d slices (%v)", len(slices), err)
			}
			es := slices[0]
			if es.Labels[mcsimport.LabelSourceSite] != "east" || es.Labels[discoveryv1.LabelServiceName] != mcsimport.DerivedServiceName("cart") || es.AddressType != discoveryv1.AddressTypeFQDN || len(es.Endpoints) != 1 || es.Endpoints[0].Addresses[0] != gwHost || !*es.Endpoints[0].Conditions.Ready || *es.Ports[0].Port != gwPort {
				return fmt.Errorf("slice %+v", es)
			}
			return nil
		})
	})
	t.Run("readiness in east follows into west", func(t *testing.T) {
		slice.Endpoints[0].Conditions.Ready = ptr.To(false)
		if _, err := east.Client.DiscoveryV1().EndpointSlices("shop").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 20*time.Second, "west's imported endpoint turns not ready", func() error {
			slices, err := west.importedSlices("cart")
			if err != nil || len(slices) != 1 || *slices[0].Endpoints[0].Conditions.Ready {
				return fmt.Errorf("slices %v (%v)", slices, err)
			}
			return nil
		})
	})
	t.Run("clusters that disagree on ports get the Conflict condition", func(t *testing.T) {
		west.export(t, "cart", 8080, "10.2.0.5")
		for _, c := range []*cluster{east, west} {
			harness.Eventually(t, 20*time.Second, c.Name+"'s ServiceExport reports the conflict", func() error {
				cond, err := c.condition("cart", mcsv1a1.ServiceExportConflict)
				if err != nil {
					return err
				}
				if cond.Status != metav1.ConditionTrue {
					return fmt.Errorf("Conflict %s: %s", cond.Status, cond.Message)
				}
				return nil
			})
		}
		if cond, err := east.condition("cart", mcsv1a1.ServiceExportValid); err != nil || cond.Status != metav1.ConditionTrue {
			t.Fatalf("east Valid = %+v, %v", cond, err)
		}
	})
	t.Run("a port change in east reaches west's derived Service", func(t *testing.T) {
		svc, err := east.Client.CoreV1().Services("shop").Get(ctx, "cart", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		svc.Spec.Ports[0].Port = 81
		if _, err := east.Client.CoreV1().Services("shop").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 20*time.Second, "west's derived Service serves port 81", func() error {
			derived, err := west.Client.CoreV1().Services("shop").Get(ctx, mcsimport.DerivedServiceName("cart"), metav1.GetOptions{})
			if err != nil {
				return err
			}
			si, err := west.mcs.MulticlusterV1alpha1().ServiceImports("shop").Get(ctx, "cart", metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(derived.Spec.Ports) != 1 || derived.Spec.Ports[0].Port != 81 || len(si.Spec.IPs) != 1 || si.Spec.IPs[0] != derived.Spec.ClusterIP {
				return fmt.Errorf("derived Service ports %v IP %s, ServiceImport IPs %v", derived.Spec.Ports, derived.Spec.ClusterIP, si.Spec.IPs)
			}
			return nil
		})
	})
	t.Run("a Service and an EndpointSlice of the user's with meshfed's names are left alone", func(t *testing.T) {
		theirs, err := west.Client.CoreV1().Services("shop").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: mcsimport.DerivedServiceName("till")},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "x", Port: 1234, Protocol: corev1.ProtocolTCP}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		theirSlice, err := west.Client.DiscoveryV1().EndpointSlices("shop").Create(ctx, &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: "till-east-meshfed"},
			AddressType: discoveryv1.AddressTypeIPv4}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		east.export(t, "till", 80, "10.1.0.6")
		harness.Eventually(t, 20*time.Second, "west imports shop/till, without a ClusterSetIP", func() error {
			si, err := west.mcs.MulticlusterV1alpha1().ServiceImports("shop").Get(ctx, "till", metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(si.Spec.IPs) != 0 {
				return fmt.Errorf("ServiceImport IPs %v: taken from a Service that is not meshfed's", si.Spec.IPs)
			}
			return nil
		})
		now, err := west.Client.CoreV1().Services("shop").Get(ctx, theirs.Name, metav1.GetOptions{})
		if err != nil || now.ResourceVersion != theirs.ResourceVersion {
			t.Fatalf("the user's Service changed: %+v (%v)", now, err)
		}
		harness.Eventually(t, 20*time.Second, "west's spoke says which EndpointSlice is in the way", func() error {
			if log := f.spokes["west"].p.Log(); !strings.Contains(log, "EndpointSlice shop/till-east-meshfed exists and is not meshfed's") {
				return fmt.Errorf("not in the spoke's log yet")
			}
			return nil
		})
		nowSlice, err := west.Client.DiscoveryV1().EndpointSlices("shop").Get(ctx, theirSlice.Name, metav1.GetOptions{})
		if err != nil || nowSlice.ResourceVersion != theirSlice.ResourceVersion {
			t.Fatalf("the user's EndpointSlice changed: %+v (%v)", nowSlice, err)
		}
	})
	t.Run("unexporting in east removes the import from west", func(t *testing.T) {
		if err := east.mcs.MulticlusterV1alpha1().ServiceExports("shop").Delete(ctx, "cart", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 20*time.Second, "west has no import of cart from east", func() error {
			if _, err := west.mcs.MulticlusterV1alpha1().ServiceImports("shop").Get(ctx, "cart", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("ServiceImport still there (%v)", err)
			}
			slices, err := west.importedSlices("cart")
			if err != nil || len(slices) != 0 {
				return fmt.Errorf("%d imported slices left (%v)", len(slices), err)
			}
			if _, err := west.Client.CoreV1().Services("shop").Get(ctx, mcsimport.DerivedServiceName("cart"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("the derived Service is still there (%v)", err)
			}
			return nil
		})
	})
}
