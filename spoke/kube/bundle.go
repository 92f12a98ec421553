package kube

import (
	"bytes"
	"context"
	"fmt"

	"github.com/meshfed/meshfed/spoke"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// BundleKey is the ConfigMap key of the site's CA certificates (PEM).
const BundleKey = "ca.pem"

// PublishBundle writes the site's CA certificates to a ConfigMap, as
// kube-root-ca.crt does for the cluster's: pods that attest with their
// ServiceAccount token mount it to trust their spoke. Not secret.
func PublishBundle(ctx context.Context, c kubernetes.Interface, namespace, name string, pem []byte) error {
	cms := c.CoreV1().ConfigMaps(namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cm, err := cms.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = cms.Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{"app.kubernetes.io/managed-by": "meshfed"}},
				Data:       map[string]string{BundleKey: string(pem)},
			}, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		if bytes.Equal([]byte(cm.Data[BundleKey]), pem) {
			return nil
		}
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[BundleKey] = string(pem)
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("kube: publish the site CA to ConfigMap %s/%s: %w", namespace, name, err)
	}
	return nil
}

// BundleConfigMap publishes the site's CA certificates to a ConfigMap for
// the spoke (PublishBundle).
type BundleConfigMap struct {
	Client          kubernetes.Interface
	Namespace, Name string
}

var _ spoke.BundlePublisher = BundleConfigMap{}

// PublishBundle implements spoke.BundlePublisher.
func (b BundleConfigMap) PublishBundle(ctx context.Context, pem []byte) error {
	return PublishBundle(ctx, b.Client, b.Namespace, b.Name, pem)
}
