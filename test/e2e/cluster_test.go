package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/test/harness"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
)

func TestClusterRegister(t *testing.T) {
	k := harness.KubeAPIServer(t, harness.Etcd(t), "east")
	f := newFederation(t)
	ctx := context.Background()
	register := []string{"cluster", "register", "east", "--kubeconfig", k.Kubeconfig, "--region", "us-east", "--zone", "us-east-1a", "--gateway-address", "gw-east.meshfed.test:15443"}
	meshfedNamespace := func() (*corev1.Namespace, error) {
		return k.Client.CoreV1().Namespaces().Get(ctx, "meshfed-system", metav1.GetOptions{})
	}

	t.Run("--dry-run prints the manifests and creates nothing", func(t *testing.T) {
		out := f.mustCLI(append(register, "--dry-run", "-o", "yaml")...)
		for _, want := range []string{"kind: CustomResourceDefinition", "kind: ClusterRole", "kind: ValidatingAdmissionPolicy", "kind: Deployment", "name: meshfed-spoke", joinPlaceholderText} {
			if !strings.Contains(out, want) {
				t.Errorf("dry-run output lacks %q", want)
			}
		}
		if _, err := meshfedNamespace(); !apierrors.IsNotFound(err) {
			t.Errorf("dry-run created meshfed-system (%v)", err)
		}
		if _, err := f.cli("site", "show", "east"); err == nil {
			t.Error("dry-run recorded the site at the hub")
		}
	})
	t.Run("register installs the spoke and records the site", func(t *testing.T) {
		f.mustCLI(register...)
		for _, dep := range []string{"meshfed-spoke", "meshfed-gateway"} {
			if _, err := k.Client.AppsV1().Deployments("meshfed-system").Get(ctx, dep, metav1.GetOptions{}); err != nil {
				t.Errorf("deployment %s: %v", dep, err)
			}
		}
		sec, err := k.Client.CoreV1().Secrets("meshfed-system").Get(ctx, "meshfed-join", metav1.GetOptions{})
		if err != nil || !strings.HasPrefix(string(sec.Data["token"]), "mf1.") || string(sec.Data["hub"]) != f.hubAddr {
			t.Fatalf("join secret %v, %v", sec, err)
		}
		var s catalog.Site
		if err := json.Unmarshal([]byte(f.mustCLI("site", "show", "east", "-o", "json")), &s); err != nil || s.Kind != "kubernetes" || s.Locality.Zone != "us-east-1a" {
			t.Fatalf("site at the hub: %+v (%v)", s, err)
		}
	})
	t.Run("registering again duplicates nothing", func(t *testing.T) {
		f.mustCLI(register...)
		deps, err := k.Client.AppsV1().Deployments("meshfed-system").List(ctx, metav1.ListOptions{})
		if err != nil || len(deps.Items) != 2 {
			t.Fatalf("%d deployments after a second register (%v), want 2", len(deps.Items), err)
		}
		out := f.mustCLI("cluster", "list", "-o", "json")
		var sites []catalog.Site
		if err := json.Unmarshal([]byte(out), &sites); err != nil || len(sites) != 1 || sites[0].Name != "east" {
			t.Fatalf("cluster list = %s (%v)", out, err)
		}
	})
	t.Run("the spoke's ServiceAccount has least privilege", func(t *testing.T) {
		cfg := rest.CopyConfig(k.Config)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:meshfed-system:meshfed-spoke", Groups: []string{"system:serviceaccounts", "system:serviceaccounts:meshfed-system", "system:authenticated"}}
		sa := kubernetes.NewForConfigOrDie(cfg)
		// RBAC bindings, too, take effect within moments.
		harness.Eventually(t, 15*time.Second, "the spoke can list services", func() error {
			_, err := sa.CoreV1().Services("").List(ctx, metav1.ListOptions{})
			return err
		})
		if _, err := sa.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("listing secrets = %v, want forbidden", err)
		}
		slice := func(labels map[string]string) *discoveryv1.EndpointSlice {
			return &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{GenerateName: "probe-", Labels: labels}, AddressType: discoveryv1.AddressTypeFQDN,
				Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"gw.meshfed.test"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}}}
		}
		// The API server loads a new admission policy within moments.
		harness.Eventually(t, 15*time.Second, "the admission policy refuses a slice that is not meshfed's", func() error {
			es, err := sa.DiscoveryV1().EndpointSlices("default").Create(ctx, slice(map[string]string{discoveryv1.LabelServiceName: "kubernetes"}), metav1.CreateOptions{})
			if err == nil {
				_ = k.Client.DiscoveryV1().EndpointSlices("default").Delete(ctx, es.Name, metav1.DeleteOptions{})
				return fmt.Errorf("accepted")
			}
			if !strings.Contains(err.Error(), "managed by meshfed") {
				return err
			}
			return nil
		})
		harness.Eventually(t, 15*time.Second, "the spoke writes meshfed's own slice", func() error {
			_, err := sa.DiscoveryV1().EndpointSlices("default").Create(ctx, slice(map[string]string{discoveryv1.LabelManagedBy: "meshfed"}), metav1.CreateOptions{})
			return err
		})
		// Services: only meshfed's own (the imports' ClusterSetIPs).
		svc := func(name string, labels map[string]string) *corev1.Service {
			return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}
		}
		if _, err := sa.CoreV1().Services("default").Create(ctx, svc("probe-foreign", nil), metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "managed by meshfed") {
			t.Errorf("creating a Service that is not meshfed's = %v, want refused by the admission policy", err)
		}
		if _, err := sa.CoreV1().Services("default").Create(ctx, svc("meshfed-probe", map[string]string{discoveryv1.LabelManagedBy: "meshfed"}), metav1.CreateOptions{}); err != nil {
			t.Errorf("creating meshfed's own Service: %v", err)
		}
	})
	t.Run("remove leaves no meshfed object behind", func(t *testing.T) {
		f.mustCLI("cluster", "remove", "east", "--kubeconfig", k.Kubeconfig)
		if err := noMeshfedObjects(ctx, k); err != nil {
			t.Fatal(err)
		}
		if _, err := f.cli("site", "show", "east"); err == nil {
			t.Error("the site is still at the hub")
		}
	})
}

const joinPlaceholderText = "one-time join token, created when applied"

// noMeshfedObjects checks the cluster holds nothing of meshfed's. The test
// cluster runs no namespace controller, so meshfed-system may linger as
// Terminating, empty.
func noMeshfedObjects(ctx context.Context, k *harness.Kube) error {
	sel := metav1.ListOptions{LabelSelector: "app.kubernetes.io/managed-by=meshfed"}
	if l, _ := k.Client.RbacV1().ClusterRoles().List(ctx, sel); len(l.Items) > 0 {
		return fmt.Errorf("ClusterRole %s left", l.Items[0].Name)
	}
	if l, _ := k.Client.RbacV1().ClusterRoleBindings().List(ctx, sel); len(l.Items) > 0 {
		return fmt.Errorf("ClusterRoleBinding %s left", l.Items[0].Name)
	}
	if l, _ := k.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies().List(ctx, sel); len(l.Items) > 0 {
		return fmt.Errorf("ValidatingAdmissionPolicy %s left", l.Items[0].Name)
	}
	if l, _ := k.Client.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{LabelSelector: "endpointslice.kubernetes.io/managed-by=meshfed"}); len(l.Items) > 0 {
		return fmt.Errorf("EndpointSlice %s/%s left", l.Items[0].Namespace, l.Items[0].Name)
	}
	for _, kind := range []string{"deployments", "secrets", "serviceaccounts", "services"} {
		var n int
		switch kind {
		case "deployments":
			l, _ := k.Client.AppsV1().Deployments("meshfed-system").List(ctx, metav1.ListOptions{})
			n = len(l.Items)
		case "secrets":
			l, _ := k.Client.CoreV1().Secrets("meshfed-system").List(ctx, metav1.ListOptions{})
			n = len(l.Items)
		case "serviceaccounts":
			l, _ := k.Client.CoreV1().ServiceAccounts("meshfed-system").List(ctx, sel)
			n = len(l.Items)
		case "services":
			l, _ := k.Client.CoreV1().Services("meshfed-system").List(ctx, metav1.ListOptions{})
			n = len(l.Items)
		}
		if n > 0 {
			return fmt.Errorf("%d %s left in meshfed-system", n, kind)
		}
	}
	// What the spoke wrote in other namespaces (imports' derived Services).
	if l, _ := k.Client.CoreV1().Services("").List(ctx, metav1.ListOptions{LabelSelector: "endpointslice.kubernetes.io/managed-by=meshfed"}); len(l.Items) > 0 {
		return fmt.Errorf("Service %s/%s left", l.Items[0].Namespace, l.Items[0].Name)
	}
	ns, err := k.Client.CoreV1().Namespaces().Get(ctx, "meshfed-system", metav1.GetOptions{})
	if err == nil && ns.DeletionTimestamp == nil {
		return fmt.Errorf("namespace meshfed-system is not being deleted")
	}
	if _, err := k.Client.Discovery().ServerResourcesForGroupVersion("multicluster.x-k8s.io/v1alpha1"); err == nil {
		return fmt.Errorf("the MCS CRDs register created are still served")
	}
	return nil
}
