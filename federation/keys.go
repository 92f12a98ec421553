package federation

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"google.golang.org/protobuf/proto"
)

// ServiceKey is the resource key of site's copy of namespace/name.
func ServiceKey(site, namespace, name string) string {
	return "svc/" + site + "/" + namespace + "/" + name
}

// SiteServicesPrefix is the key prefix of every service of site.
func SiteServicesPrefix(site string) string { return "svc/" + site + "/" }

// SiteKey is the resource key of a site record.
func SiteKey(name string) string { return "site/" + name }

// BundleKey is the resource key of a site's own trust bundle.
func BundleKey(site string) string { return "bundle/" + site }

// ExternalBundleKey is the resource key of an imported trust domain's
// bundle (hub-owned).
func ExternalBundleKey(trustDomain string) string { return "xbundle/" + trustDomain }

// PolicyKey is the resource key of a service's traffic policy (hub-owned).
func PolicyKey(namespace, name string) string { return "policy/" + namespace + "/" + name }

// PolicyResource wraps a traffic policy as a versioned resource.
func PolicyResource(p *meshfedv1.TrafficPolicy) *meshfedv1.Resource {
	return &meshfedv1.Resource{Key: PolicyKey(p.GetNamespace(), p.GetName()), Version: Version(p), Body: &meshfedv1.Resource_Policy{Policy: p}}
}

// Version is the content hash of a resource body: equal bodies have equal
// versions, across restarts and on both sides of a stream.
func Version(body proto.Message) string {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(body)
	if err != nil {
		panic(fmt.Sprintf("federation: marshal %T: %v", body, err))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:12])
}

// ServiceResource wraps a service as a versioned resource.
func ServiceResource(s *meshfedv1.Service) *meshfedv1.Resource {
	return &meshfedv1.Resource{
		Key:     ServiceKey(s.GetSite(), s.GetNamespace(), s.GetName()),
		Version: Version(s),
		Body:    &meshfedv1.Resource_Service{Service: s},
	}
}

// BundleResource wraps a bundle as a versioned resource, keyed by its site,
// or by its trust domain when it has none (an imported one).
func BundleResource(b *meshfedv1.Bundle) *meshfedv1.Resource {
	key := BundleKey(b.GetSite())
	if b.GetSite() == "" {
		key = ExternalBundleKey(b.GetTrustDomain())
	}
	return &meshfedv1.Resource{Key: key, Version: Version(b), Body: &meshfedv1.Resource_Bundle{Bundle: b}}
}

// SourceStatusKey is the resource key of a site's source status (owned by
// the site's spoke).
func SourceStatusKey(site string) string { return "status/" + site }

// SourceStatusResource wraps a source status as a versioned resource.
func SourceStatusResource(s *meshfedv1.SourceStatus) *meshfedv1.Resource {
	return &meshfedv1.Resource{Key: SourceStatusKey(s.GetSite()), Version: Version(s), Body: &meshfedv1.Resource_SourceStatus{SourceStatus: s}}
}

// RotationKey is the resource key of a site's CA rotation request
// (hub-owned: the hub asks, the site's spoke acts).
func RotationKey(site string) string { return "rotate/" + site }

// RotationResource wraps a rotation request as a versioned resource.
func RotationResource(r *meshfedv1.CARotation) *meshfedv1.Resource {
	return &meshfedv1.Resource{Key: RotationKey(r.GetSite()), Version: Version(r), Body: &meshfedv1.Resource_Rotation{Rotation: r}}
}

// RevocationsKey is the resource key of the hosts removed from a site
// (hub-owned: the hub decides, the site's spoke refuses them).
func RevocationsKey(site string) string { return "revoked/" + site }

// RevocationsResource wraps a site's removed hosts as a versioned resource.
func RevocationsResource(r *meshfedv1.NodeRevocations) *meshfedv1.Resource {
	return &meshfedv1.Resource{Key: RevocationsKey(r.GetSite()), Version: Version(r), Body: &meshfedv1.Resource_Revocations{Revocations: r}}
}

// SiteResource wraps a site as a versioned resource.
func SiteResource(s *meshfedv1.Site) *meshfedv1.Resource {
	return &meshfedv1.Resource{
		Key:     SiteKey(s.GetName()),
		Version: Version(s),
		Body:    &meshfedv1.Resource_Site{Site: s},
	}
}

// CheckResource verifies that a received resource's key and version match
// its body, so a peer cannot store a body under another key or a stale
// version.
func CheckResource(r *meshfedv1.Resource) error {
	var want *meshfedv1.Resource
	switch b := r.GetBody().(type) {
	case *meshfedv1.Resource_Service:
		want = ServiceResource(b.Service)
	case *meshfedv1.Resource_Site:
		want = SiteResource(b.Site)
	case *meshfedv1.Resource_Bundle:
		want = BundleResource(b.Bundle)
	case *meshfedv1.Resource_Rotation:
		want = RotationResource(b.Rotation)
	case *meshfedv1.Resource_Revocations:
		want = RevocationsResource(b.Revocations)
	case *meshfedv1.Resource_SourceStatus:
		want = SourceStatusResource(b.SourceStatus)
	case *meshfedv1.Resource_Policy:
		want = PolicyResource(b.Policy)
	case *meshfedv1.Resource_GossipKeyring:
		want = GossipKeyringResource(b.GossipKeyring)
	default:
		return fmt.Errorf("resource %q has no body", r.GetKey())
	}
	if r.GetKey() != want.Key {
		return fmt.Errorf("resource key %q does not match its body (%s)", r.GetKey(), want.Key)
	}
	if r.GetVersion() != want.Version {
		return fmt.Errorf("resource %s: version %q does not match its content (%s)", r.GetKey(), r.GetVersion(), want.Version)
	}
	return nil
}

// KeySite returns the site that owns key: the site of a service or of a
// site bundle; "" for hub-owned keys (site records, imported bundles).
// Only the owner's spoke may write a key.
func KeySite(key string) string {
	for _, prefix := range []string{"bundle/", "status/"} {
		if site, ok := strings.CutPrefix(key, prefix); ok {
			return site
		}
	}
	rest, ok := strings.CutPrefix(key, "svc/")
	if !ok {
		return ""
	}
	site, _, _ := strings.Cut(rest, "/")
	return site
}

// OwnedBy reports whether site's spoke owns key.
func OwnedBy(key, site string) bool { return KeySite(key) == site }

// GossipKeyringKey is the resource key of the WAN gossip keyring
// (hub-owned).
const GossipKeyringKey = "gossip/keyring"

// GossipKeyringResource wraps the gossip keyring as a versioned resource.
func GossipKeyringResource(k *meshfedv1.GossipKeyring) *meshfedv1.Resource {
	return &meshfedv1.Resource{Key: GossipKeyringKey, Version: Version(k), Body: &meshfedv1.Resource_GossipKeyring{GossipKeyring: k}}
}
