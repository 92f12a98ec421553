package store

import (
	"context"
	"encoding/json"
	"fmt"
)

// ListJSON decodes every JSON record under prefix, keyed by store key. A
// record that does not decode is an error naming its key: stored state is
// never skipped silently.
func ListJSON[T any](ctx context.Context, s Store, prefix string) (map[string]T, error) {
	kvs, err := s.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	out := make(map[string]T, len(kvs))
	for _, kv := range kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("stored record %s is damaged: %w", kv.Key, err)
		}
		out[kv.Key] = v
	}
	return out, nil
}
