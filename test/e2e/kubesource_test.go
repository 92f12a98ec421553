package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

// hubService returns the hub's copies of ns/name ("" error when absent).
func (f *federation) hubService(id string) ([]catalog.Service, error) {
	out, err := f.cli("service", "show", id, "-o", "json")
	if err != nil {
		return nil, err
	}
	var svcs []catalog.Service
	return svcs, json.Unmarshal([]byte(out), &svcs)
}

func TestKubernetesSource(t *testing.T) {
	k := harness.KubeAPIServer(t, harness.Etcd(t), "east")
	root, _ := filepath.Abs("../..")
	k.ApplyFile(t, filepath.Join(root, "deploy", "kubernetes", "mcs-crds.yaml"))
	ctx := context.Background()
	c := k.Client
	rc, err := clientcmd.BuildConfigFromFlags("", k.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	mcs, err := mcsclient.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}

	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1", Labels: map[string]string{
		corev1.LabelTopologyRegion: "us-east", corev1.LabelTopologyZone: "us-east-1a"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "cart-1", Labels: map[string]string{"app": "cart", "version": "v2"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "cart", NodeName: "node-1", Containers: []corev1.Container{{Name: "cart", Image: "cart:v2"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Services("shop").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "cart"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "cart"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// What the endpointslice controller would write for the pods.
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "cart-x1", Labels: map[string]string{discoveryv1.LabelServiceName: "cart"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To("node-1"), TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "cart-1"}},
			{Addresses: []string{"10.1.0.6"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)}, Zone: ptr.To("us-east-1b")},
		},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	if slice, err = c.DiscoveryV1().EndpointSlices("shop").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	f := newFederation(t)
	east := f.addSite("east", "us-east-1a", "", "--kubeconfig", k.Kubeconfig)
	f.addSite("west", "us-west-2a", siteC)
	harness.Eventually(t, 20*time.Second, "the Kubernetes spoke is connected", func() error {
		v, err := harness.View(east.http)
		if err != nil || !v.Synced {
			return fmt.Errorf("east synced: %v (%v)", v != nil && v.Synced, err)
		}
		return nil
	})

	t.Run("a Service that is not exported is not federated", func(t *testing.T) {
		if _, err := f.hubService("shop/cart"); err == nil {
			t.Fatal("shop/cart reached the hub without a ServiceExport")
		}
	})
	t.Run("an exported Service reaches the hub with zones, health and identity", func(t *testing.T) {
		if _, err := mcs.MulticlusterV1alpha1().ServiceExports("shop").Create(ctx, &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		want := []catalog.Endpoint{
			{Site: "east", Address: "10.1.0.5", Port: 8080, PortName: "http", Region: "us-east", Zone: "us-east-1a", Health: "healthy", Weight: 1, Labels: map[string]string{"version": "v2"}, Identity: "spiffe://east.test.meshfed/ns/shop/sa/cart"},
			{Site: "east", Address: "10.1.0.6", Port: 8080, PortName: "http", Region: "test", Zone: "us-east-1b", Health: "unhealthy", Weight: 1},
		}
		harness.Eventually(t, 15*time.Second, "the hub has shop/cart from east", func() error {
			return endpointsAre(f, "shop/cart", want)
		})
	})
	t.Run("readiness changes follow", func(t *testing.T) {
		slice.Endpoints[1].Conditions.Ready = ptr.To(true)
		if slice, err = c.DiscoveryV1().EndpointSlices("shop").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 15*time.Second, "10.1.0.6 turns healthy at the hub", func() error {
			svcs, err := f.hubService("shop/cart")
			if err != nil {
				return err
			}
			for _, e := range svcs[0].Endpoints {
				if e.Address == "10.1.0.6" && e.Health != "healthy" {
					return fmt.Errorf("10.1.0.6 is %s", e.Health)
				}
			}
			return nil
		})
	})
	t.Run("unexporting withdraws the service", func(t *testing.T) {
		if err := mcs.MulticlusterV1alpha1().ServiceExports("shop").Delete(ctx, "cart", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 15*time.Second, "shop/cart leaves the hub", func() error {
			if _, err := f.hubService("shop/cart"); err == nil {
				return fmt.Errorf("still there")
			}
			return nil
		})
	})
	t.Run("with the API server down the spoke keeps its services and the hub says why", func(t *testing.T) {
		if _, err := mcs.MulticlusterV1alpha1().ServiceExports("shop").Create(ctx, &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 15*time.Second, "shop/cart is back at the hub", func() error {
			_, err := f.hubService("shop/cart")
			return err
		})
		k.Stop()
		harness.Eventually(t, 20*time.Second, "the hub reports east's API as unreachable", func() error {
			return siteSourceSays(f, "east", "unreachable")
		})
		if _, err := f.hubService("shop/cart"); err != nil {
			t.Fatalf("east's services left the hub while its API server was down: %v", err)
		}
	})
	t.Run("the spoke recovers by itself", func(t *testing.T) {
		k.Start()
		harness.Eventually(t, 30*time.Second, "the hub reports east's source ok", func() error {
			return siteSourceSays(f, "east", "ok")
		})
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.1.0.7"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
		if _, err := c.DiscoveryV1().EndpointSlices("shop").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 30*time.Second, "a change after the outage reaches the hub", func() error {
			svcs, err := f.hubService("shop/cart")
			if err != nil {
				return err
			}
			if n := len(svcs[0].Endpoints); n != 3 {
				return fmt.Errorf("%d endpoints", n)
			}
			return nil
		})
	})
	t.Run("a refused credential gives a clear error", func(t *testing.T) {
		cfg, err := os.ReadFile(k.Kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		revoked := filepath.Join(t.TempDir(), "revoked.kubeconfig")
		os.WriteFile(revoked, []byte(strings.Replace(string(cfg), "admin-east", "revoked-token", 1)), 0o600)
		f.addSite("north", "us-east-1c", "", "--kubeconfig", revoked)
		harness.Eventually(t, 20*time.Second, "the hub reports north's refused credential", func() error {
			return siteSourceSays(f, "north", "refuses the spoke's credential")
		})
	})
}

// siteSourceSays checks what the hub shows as site's source status.
func siteSourceSays(f *federation, site, want string) error {
	out, err := f.cli("site", "show", site, "-o", "json")
	if err != nil {
		return err
	}
	var s catalog.Site
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		return err
	}
	if !strings.Contains(s.Source, want) {
		return fmt.Errorf("source of %s is %q", site, s.Source)
	}
	return nil
}

func endpointsAre(f *federation, id string, want []catalog.Endpoint) error {
	svcs, err := f.hubService(id)
	if err != nil {
		return err
	}
	got, _ := json.Marshal(svcs[0].Endpoints)
	w, _ := json.Marshal(want)
	if string(got) != string(w) {
		return fmt.Errorf("endpoints\n got %s\nwant %s", got, w)
	}
	return nil
}
