package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/store"
)

// Store key prefixes.
const (
	keyCA       = "ca"
	keySites    = "sites/"
	keyTokens   = "tokens/"
	keyResource = "catalog/"
)

// listJSON decodes every JSON record under prefix, keyed by store key.
func listJSON[T any](ctx context.Context, s store.Store, prefix string) (map[string]T, error) {
	kvs, err := s.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("hub: list %s: %w", prefix, err)
	}
	out := make(map[string]T, len(kvs))
	for _, kv := range kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("hub: stored record %s is damaged: %w", kv.Key, err)
		}
		out[kv.Key] = v
	}
	return out, nil
}

// siteRecord is a site as stored.
type siteRecord struct {
	Site     catalog.Site `json:"site"`
	Created  time.Time    `json:"created"`
	LastSync time.Time    `json:"lastSync,omitzero"`
	// ConnectedVia is the hub whose stream the site's spoke holds, while it
	// does; with a shared store it keeps LastSync fresh (see heartbeat).
	ConnectedVia string `json:"connectedVia,omitempty"`
}

// tokenRecord is a join token as stored: only a hash of its secret.
type tokenRecord struct {
	Site       string    `json:"site"`
	SecretHash string    `json:"secretHash"`
	Expires    time.Time `json:"expires"`
	Used       time.Time `json:"used,omitzero"`
	// Node is set on node tokens (host attestation at the site's spoke).
	Node string `json:"node,omitempty"`
}

// caRecord is the federation CA as stored.
type caRecord struct {
	Federation string `json:"federation"`
	CertPEM    string `json:"cert"`
	KeyPEM     string `json:"key"`
}
