package kube

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/meshfed/meshfed/trust/siteca"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// SecretStorage keeps a site CA in one Kubernetes Secret, so an in-cluster
// spoke's CA survives its pod. Each save replaces the Secret's data in one
// write: key, certificate and state never disagree.
type SecretStorage struct {
	Client          kubernetes.Interface
	Namespace, Name string
}

var _ siteca.Storage = SecretStorage{}

// ParseSecretRef parses "namespace/name".
func ParseSecretRef(ref string) (namespace, name string, err error) {
	ns, n, ok := strings.Cut(ref, "/")
	if !ok || ns == "" || n == "" {
		return "", "", fmt.Errorf("secret %q: want namespace/name", ref)
	}
	return ns, n, nil
}

func timeout() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// Load implements siteca.Storage.
func (s SecretStorage) Load() (map[string][]byte, error) {
	ctx, cancel := timeout()
	defer cancel()
	sec, err := s.Client.CoreV1().Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kube: read CA secret %s/%s: %w (the spoke needs get/update on it)", s.Namespace, s.Name, err)
	}
	return sec.Data, nil
}

// Save implements siteca.Storage.
func (s SecretStorage) Save(files map[string][]byte) error {
	ctx, cancel := timeout()
	defer cancel()
	secrets := s.Client.CoreV1().Secrets(s.Namespace)
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		sec, err := secrets.Get(ctx, s.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = secrets.Create(ctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, Labels: map[string]string{"app.kubernetes.io/managed-by": "meshfed"}},
				Type:       corev1.SecretTypeOpaque,
				Data:       files,
			}, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		sec.Data = files
		_, err = secrets.Update(ctx, sec, metav1.UpdateOptions{})
		return err
	})
}
