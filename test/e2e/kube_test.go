package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/meshfed/meshfed/trust/ca"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// saToken asks the real apiserver for a projected token of ns/sa.
func saToken(t *testing.T, k *harness.Kube, ns, sa, audience string) string {
	t.Helper()
	r, err := k.Client.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: ptr.To[int64](600)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.Token
}

func TestKubernetesAttestation(t *testing.T) {
	k := harness.KubeAPIServer(t, harness.Etcd(t), "east")
	ctx := context.Background()
	for _, ns := range []string{"shop", "meshfed-system"} {
		if _, err := k.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, sa := range []string{"cart", "gone"} {
		if _, err := k.Client.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	f := newFederation(t)
	east := f.addSite("east", "z1", "services: []\n", "--kubeconfig", k.Kubeconfig, "--ca-secret", "meshfed-system/east-ca", "--credential-secret", "meshfed-system/east-cred", "--ca-configmap", "meshfed-system/meshfed-site-bundle")
	west := f.addSite("west", "z2", "services: []\n")
	f.waitBundles(t)
	// A pod trusts its spoke through the site's bundle, as published.
	pinOf := func(site string) string {
		certs, err := ca.ParseCertsPEM([]byte(f.mustCLI("trust", "bundle", "show", "--trust-domain", site+".test.meshfed", "-o", "pem")))
		if err != nil {
			t.Fatal(err)
		}
		return ca.Pin(certs[len(certs)-1])
	}
	attest := func(s *spokeProc, token string) (workload, error) {
		return attestRequest(t, s, pinOf(s.site), &meshfedv1.AttestRequest{Credential: &meshfedv1.AttestRequest_KubernetesToken{KubernetesToken: token}})
	}

	t.Run("a ServiceAccount token reviewed by the apiserver gets its SVID", func(t *testing.T) {
		w, err := attest(east, saToken(t, k, "shop", "cart", "meshfed"))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := w.svid.ID.String(), "spiffe://east.test.meshfed/ns/shop/sa/cart"; got != want {
			t.Fatalf("SVID %s, want %s", got, want)
		}
	})
	t.Run("a pod trusts its spoke through the published CA ConfigMap and attests with its token file", func(t *testing.T) {
		// What the gateway Deployment mounts: the projected token and the
		// ConfigMap the spoke publishes.
		var pem string
		harness.Eventually(t, 10*time.Second, "the spoke publishes its CA", func() error {
			cm, err := k.Client.CoreV1().ConfigMaps("meshfed-system").Get(ctx, "meshfed-site-bundle", metav1.GetOptions{})
			if err != nil {
				return err
			}
			pem = cm.Data["ca.pem"]
			return nil
		})
		if pem != f.mustCLI("trust", "bundle", "show", "--trust-domain", "east.test.meshfed", "-o", "pem") {
			t.Fatal("the ConfigMap's CA is not the bundle the hub has for east")
		}
		dir := t.TempDir()
		tokenFile, caFile := filepath.Join(dir, "token"), filepath.Join(dir, "ca.pem")
		writeFile(t, tokenFile, saToken(t, k, "shop", "cart", "meshfed"))
		writeFile(t, caFile, pem)
		c, err := identityclient.New(ctx, identityclient.Options{Addr: east.identity, KubernetesTokenFile: tokenFile, CAFile: caFile})
		if err != nil {
			t.Fatal(err)
		}
		if got, want := c.SVID().ID.String(), "spiffe://east.test.meshfed/ns/shop/sa/cart"; got != want {
			t.Fatalf("SVID %s, want %s", got, want)
		}
		// Another site's CA does not authenticate east's spoke.
		writeFile(t, caFile, f.mustCLI("trust", "bundle", "show", "--trust-domain", "west.test.meshfed", "-o", "pem"))
		if _, err := identityclient.New(ctx, identityclient.Options{Addr: east.identity, KubernetesTokenFile: tokenFile, CAFile: caFile}); err == nil {
			t.Fatal("attested through a spoke the CA file does not vouch for")
		}
	})
	t.Run("a token for another audience is refused", func(t *testing.T) {
		_, err := attest(east, saToken(t, k, "shop", "cart", "someone-else"))
		if err == nil || !strings.Contains(err.Error(), "audience") {
			t.Fatalf("attest = %v, want a refusal naming the audience", err)
		}
	})
	t.Run("a forged token is refused", func(t *testing.T) {
		if _, err := attest(east, "eyJhbGciOiJub25lIn0.e30."); err == nil || !strings.Contains(err.Error(), "does not accept") {
			t.Fatalf("attest = %v, want the cluster's refusal", err)
		}
	})
	t.Run("the token of a deleted ServiceAccount is refused", func(t *testing.T) {
		token := saToken(t, k, "shop", "gone", "meshfed")
		if err := k.Client.CoreV1().ServiceAccounts("shop").Delete(ctx, "gone", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		harness.Eventually(t, 10*time.Second, "the deleted ServiceAccount's token is refused", func() error {
			if _, err := attest(east, token); err == nil {
				return context.DeadlineExceeded
			}
			return nil
		})
	})
	t.Run("the spoke keeps CA and credential in Secrets: a new pod with an empty data dir is the same spoke", func(t *testing.T) {
		sec, err := k.Client.CoreV1().Secrets("meshfed-system").Get(ctx, "east-ca", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{"ca.key", "ca.crt", "state.json"} {
			if len(sec.Data[key]) == 0 {
				t.Errorf("Secret east-ca has no %s", key)
			}
		}
		for _, f := range []string{"ca", "spoke.conf"} {
			if _, err := os.Stat(filepath.Join(east.dir, f)); !os.IsNotExist(err) {
				t.Errorf("the spoke wrote %s under its data dir too (%v)", f, err)
			}
		}
		cred, err := k.Client.CoreV1().Secrets("meshfed-system").Get(ctx, "east-cred", metav1.GetOptions{})
		if err != nil || len(cred.Data["spoke.conf"]) == 0 {
			t.Fatalf("credential Secret: %v", err)
		}
		published := f.mustCLI("trust", "bundle", "show", "--trust-domain", "east.test.meshfed", "-o", "pem")
		if published != string(sec.Data["ca.crt"]) {
			t.Fatal("the bundle the hub has for east is not the CA in the Secret")
		}
		// A new pod: empty data dir, and the join token in its args is spent.
		for i, a := range east.args {
			if a == "--data-dir" {
				east.args[i+1] = t.TempDir()
			}
		}
		f.restartSpoke(east)
		if _, err := attest(east, saToken(t, k, "shop", "cart", "meshfed")); err != nil {
			t.Fatalf("attest after restart: %v", err)
		}
		if again := f.mustCLI("trust", "bundle", "show", "--trust-domain", "east.test.meshfed", "-o", "pem"); again != published {
			t.Fatal("the restarted spoke made a new CA instead of loading the Secret's")
		}
	})
	t.Run("a spoke without a cluster says so", func(t *testing.T) {
		_, err := attest(west, saToken(t, k, "shop", "cart", "meshfed"))
		if err == nil || !strings.Contains(err.Error(), "--kubeconfig") {
			t.Fatalf("attest at a non-Kubernetes site = %v, want a refusal saying what to do", err)
		}
	})
}
