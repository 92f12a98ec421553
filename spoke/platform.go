package spoke

import (
	"context"
	"errors"
)

// A site kind's platform, as the spoke core sees it: the kind's folder
// under spoke/ implements these with its client library (spoke/kube for
// Kubernetes), so the core imports none.

// WorkloadAttestor checks a workload's platform token.
type WorkloadAttestor interface {
	// Review returns whose token it is. An error wrapping
	// ErrNotAuthenticated: the platform does not accept the token; any
	// other: the platform could not be asked.
	Review(ctx context.Context, token string) (Workload, error)
}

// Workload is a workload identity the platform vouches for.
type Workload struct {
	Namespace, Name string
}

// ErrNotAuthenticated is a WorkloadAttestor's refusal of a token.
var ErrNotAuthenticated = errors.New("the cluster does not accept the token")

// BundlePublisher publishes the site's CA certificates (PEM) where the
// site's workloads read them.
type BundlePublisher interface {
	PublishBundle(ctx context.Context, pem []byte) error
}
