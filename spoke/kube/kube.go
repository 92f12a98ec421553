// Package kube is the spoke's link to its Kubernetes cluster: building a
// client from a kubeconfig (or the in-cluster config) and checking workload
// ServiceAccount tokens with the TokenReview API for attestation.
package kube

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/meshfed/meshfed/spoke"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ManagedBy is the EndpointSlice managed-by value of slices meshfed writes;
// the source skips them, so imports are never re-exported.
const ManagedBy = "meshfed"

// Audience is what a workload's projected ServiceAccount token must be
// issued for to attest to a meshfed spoke.
const Audience = "meshfed"

// RESTConfig loads kubeconfig (and context), or the in-cluster config when
// kubeconfig is empty.
func RESTConfig(kubeconfig, kubeContext string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kube: not running in a cluster and no --kubeconfig given: %w", err)
		}
	} else {
		rules := &clientcmd.ClientConfigLoadingRules{ExplicitPath: kubeconfig}
		cfg, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: kubeContext}).ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("kube: kubeconfig %s: %w", kubeconfig, err)
		}
	}
	cfg.UserAgent = "meshfed-spoke"
	// client-go's default of 5 requests/s would take an hour to import a
	// large federation; API Priority and Fairness protects the server.
	cfg.QPS, cfg.Burst = 200, 400
	return cfg, nil
}

// ErrNotAuthenticated is returned for a token the cluster does not accept.
var ErrNotAuthenticated = spoke.ErrNotAuthenticated

// ServiceAccount is a reviewed token's workload identity.
type ServiceAccount = spoke.Workload

// Attestor checks workloads' ServiceAccount tokens for the spoke.
type Attestor struct {
	Client kubernetes.Interface
}

var _ spoke.WorkloadAttestor = Attestor{}

// Review implements spoke.WorkloadAttestor.
func (a Attestor) Review(ctx context.Context, token string) (spoke.Workload, error) {
	return ReviewToken(ctx, a.Client, token, Audience)
}

// ReviewToken asks the cluster whether token is a valid ServiceAccount
// token for audience, and whose. The cluster checks signature, expiry,
// audience and that the ServiceAccount (and a bound pod) still exist.
func ReviewToken(ctx context.Context, c kubernetes.Interface, token, audience string) (ServiceAccount, error) {
	r, err := c.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return ServiceAccount{}, fmt.Errorf("kube: TokenReview: %w (the spoke needs the system:auth-delegator role)", err)
	}
	if !r.Status.Authenticated {
		reason := r.Status.Error
		if reason == "" {
			reason = "not authenticated"
		}
		return ServiceAccount{}, fmt.Errorf("%w: %s", ErrNotAuthenticated, reason)
	}
	if !slices.Contains(r.Status.Audiences, audience) {
		return ServiceAccount{}, fmt.Errorf("%w: the token is not for audience %q", ErrNotAuthenticated, audience)
	}
	parts := strings.Split(r.Status.User.Username, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return ServiceAccount{}, fmt.Errorf("%w: %s is not a ServiceAccount", ErrNotAuthenticated, r.Status.User.Username)
	}
	return ServiceAccount{Namespace: parts[2], Name: parts[3]}, nil
}
