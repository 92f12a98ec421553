package harness

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/kubeapply"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Kube is one real kube-apiserver.
type Kube struct {
	Name string
	URL  string
	// Kubeconfig is a file with cluster-admin rights (a static token).
	Kubeconfig string
	Config     *rest.Config
	Client     kubernetes.Interface

	t    testing.TB
	bin  string
	args []string
	proc *Process
}

// Stop kills the apiserver; its data stays in etcd.
func (k *Kube) Stop() { k.proc.Kill() }

// Start starts the apiserver again after Stop, on the same address and
// state, and waits until it is ready.
func (k *Kube) Start() {
	k.proc = Start(k.t, "kube-apiserver-"+k.Name, k.bin, k.args...)
	k.waitReady()
}

// KubeAPIServerBinary returns the pinned kube-apiserver, building it into
// the tools cache the first time (test/kube.sh).
func KubeAPIServerBinary(t testing.TB) string { return toolBinary(t, "kube.sh") }

// toolBinary runs test/<script>, which builds a pinned tool into the tools
// cache the first time, and returns the path it prints.
func toolBinary(t testing.TB, script string) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(root, "test", script)).Output()
	if err != nil {
		t.Fatalf("build a test tool (test/%s): %v", script, err)
	}
	return strings.TrimSpace(string(out))
}

// KubeAPIServer starts a kube-apiserver named name on the etcd at etcdURL,
// under its own --etcd-prefix, so several clusters share one etcd.
func KubeAPIServer(t testing.TB, etcdURL, name string) *Kube {
	t.Helper()
	bin := KubeAPIServerBinary(t)
	dir := t.TempDir()
	addr := FreePort(t)
	_, port, _ := net.SplitHostPort(addr)

	// Serving certificate from a throwaway CA, so clients verify the server.
	root, err := ca.New(spiffeid.RequireTrustDomainFromString(name+".kube.test"), name+" kube CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ca.NewKey()
	leaf, err := root.Sign(ca.Leaf{ID: spiffeid.RequireFromString("spiffe://" + name + ".kube.test/apiserver"), Key: key.Public(), TTL: 24 * time.Hour, DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ := ca.EncodeKeyPEM(key)
	saKey, _ := ca.NewKey()
	saKeyPEM, _ := ca.EncodeKeyPEM(saKey)
	saPubDER, _ := x509.MarshalPKIXPublicKey(saKey.Public())
	token := "admin-" + name
	files := map[string][]byte{
		"tls.crt":    ca.EncodeCertPEM(leaf),
		"tls.key":    keyPEM,
		"ca.crt":     ca.EncodeCertPEM(root.Cert),
		"sa.key":     saKeyPEM,
		"sa.pub":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}),
		"tokens.csv": []byte(token + ",admin,admin-uid,\"system:masters\"\n"),
	}
	for f, b := range files {
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{
		"--etcd-servers", etcdURL,
		"--etcd-prefix", "/registry-" + name,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--secure-port", port,
		"--tls-cert-file", filepath.Join(dir, "tls.crt"),
		"--tls-private-key-file", filepath.Join(dir, "tls.key"),
		"--token-auth-file", filepath.Join(dir, "tokens.csv"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--authorization-mode", "RBAC",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--cert-dir", dir,
	}
	url := "https://" + addr
	kubeconfig := filepath.Join(dir, "kubeconfig")
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: %[1]s
  cluster: {server: %[2]q, certificate-authority: %[3]q}
users:
- name: admin
  user: {token: %[4]q}
contexts:
- name: %[1]s
  context: {cluster: %[1]s, user: admin}
current-context: %[1]s
`, name, url, filepath.Join(dir, "ca.crt"), token)
	if err := os.WriteFile(kubeconfig, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	k := &Kube{Name: name, URL: url, Kubeconfig: kubeconfig, Config: rc, Client: client, t: t, bin: bin, args: args}
	k.Start()
	return k
}

func (k *Kube) waitReady() {
	k.t.Helper()
	Eventually(k.t, 90*time.Second, "kube-apiserver "+k.Name+" is ready", func() error {
		body, err := k.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(context.Background())
		if err != nil {
			return fmt.Errorf("readyz: %v %s", err, body)
		}
		return nil
	})
}

// ApplyFile applies every object of a multi-document YAML file to the
// cluster with server-side apply, like `kubectl apply --server-side -f`,
// waiting for CRDs among them to be established.
func (k *Kube) ApplyFile(t testing.TB, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := kubeapply.Objects(b)
	if err != nil {
		t.Fatal(err)
	}
	a, err := kubeapply.New(k.Config)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if err := a.Apply(context.Background(), o); err != nil {
			t.Fatal(err)
		}
	}
}
