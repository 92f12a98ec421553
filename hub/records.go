package hub

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
)

// Store key prefixes.
const (
	keyCA       = "ca"
	keySites    = "sites/"
	keyTokens   = "tokens/"
	keyResource = "catalog/"
)

// errSiteGone: the site's record is not in the store (any more).
var errSiteGone = errors.New("the site is not registered")

// applyForSite writes ops, which belong to site, only while the site's
// record is in the store. A site is removed record first, so a write that
// races the removal through another hub replica either lands before the
// removal lists the site's keys (and goes with them) or not at all.
func (h *Hub) applyForSite(ctx context.Context, site string, ops ...store.Op) error {
	return h.store.ApplyIf(ctx, keySites+site, func(cur []byte) error {
		if cur == nil {
			return errSiteGone
		}
		return nil
	}, ops...)
}

// siteKeys lists the store keys of what belongs to site besides its
// record: its services, bundle, source status and CA rotation request, and
// its tokens.
func (h *Hub) siteKeys(ctx context.Context, site string) ([]string, error) {
	kvs, err := h.store.List(ctx, keyResource+federation.SiteServicesPrefix(site))
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, kv := range kvs {
		keys = append(keys, kv.Key)
	}
	for _, k := range []string{federation.BundleKey(site), federation.SourceStatusKey(site), federation.RotationKey(site), federation.RevocationsKey(site)} {
		_, err := h.store.Get(ctx, keyResource+k)
		switch {
		case err == nil:
			keys = append(keys, keyResource+k)
		case !errors.Is(err, store.ErrNotFound):
			return nil, err
		}
	}
	tokens, err := store.ListJSON[tokenRecord](ctx, h.store, keyTokens)
	if err != nil {
		return nil, err
	}
	for key, t := range tokens {
		if t.Site == site {
			keys = append(keys, key)
		}
	}
	return keys, nil
}

// errSiteBack: a site of that name was registered (again) while what an
// earlier one left was being cleared; the rest is the new site's.
var errSiteBack = errors.New("a site of that name was registered again meanwhile")

// clearSite deletes what site has in the store while the site has no
// record: the second step of a removal, and what a removal cut short left,
// found again by a new site of the name or a starting hub. Each write of
// 100 (etcd takes up to 128) checks the record is still absent.
func (h *Hub) clearSite(ctx context.Context, site string) (int, error) {
	keys, err := h.siteKeys(ctx, site)
	if err != nil {
		return 0, err
	}
	absent := func(cur []byte) error {
		if cur != nil {
			return errSiteBack
		}
		return nil
	}
	for done := 0; done < len(keys); {
		n := min(len(keys)-done, 100)
		ops := make([]store.Op, n)
		for i, k := range keys[done : done+n] {
			ops[i] = store.Op{Key: k, Delete: true}
		}
		if err := h.store.ApplyIf(ctx, keySites+site, absent, ops...); err != nil {
			return done, err
		}
		done += n
	}
	return len(keys), nil
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

// Join and node tokens stay stored after use or expiry, so a replay is
// told when the token was used; a day after it expired nobody needs that,
// and the record goes.
const (
	keepTokensAfterExpiry = 24 * time.Hour
	sweepTokensEvery      = time.Hour
)

// sweepTokens deletes the records of tokens that expired more than
// keepTokensAfterExpiry before now, each only if it still is such a
// record as it is deleted. It returns how many went.
func (h *Hub) sweepTokens(ctx context.Context, now time.Time) (int, error) {
	tokens, err := store.ListJSON[tokenRecord](ctx, h.store, keyTokens)
	if err != nil {
		return 0, err
	}
	errKept := errors.New("kept")
	swept := 0
	for key, t := range tokens {
		if !t.sweepable(now) {
			continue
		}
		err := h.store.ApplyIf(ctx, key, func(cur []byte) error {
			var rec tokenRecord
			if cur == nil || json.Unmarshal(cur, &rec) != nil || !rec.sweepable(now) {
				return errKept
			}
			return nil
		}, store.Op{Key: key, Delete: true})
		switch {
		case err == nil:
			swept++
		case !errors.Is(err, errKept):
			return swept, err
		}
	}
	return swept, nil
}

// sweepable: the token expired over keepTokensAfterExpiry before now.
func (t tokenRecord) sweepable(now time.Time) bool {
	return now.After(t.Expires.Add(keepTokensAfterExpiry))
}

// sweepTokensRegularly deletes spent token records at start and then every
// sweepTokensEvery, until ctx ends.
func (h *Hub) sweepTokensRegularly(ctx context.Context) {
	t := time.NewTicker(sweepTokensEvery)
	defer t.Stop()
	for {
		n, err := h.sweepTokens(ctx, time.Now())
		switch {
		case err != nil && ctx.Err() == nil:
			h.log.Warn("could not delete long-expired tokens; the next sweep tries again", "err", err)
		case n > 0:
			h.log.Info("deleted the records of long-expired tokens", "tokens", n, "expired_before", time.Now().Add(-keepTokensAfterExpiry).Format(time.RFC3339))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// caRecord is the federation CA as stored.
type caRecord struct {
	Federation string `json:"federation"`
	CertPEM    string `json:"cert"`
	KeyPEM     string `json:"key"`
}
