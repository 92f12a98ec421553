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

// KeySite returns the site a service key belongs to ("" for other keys).
func KeySite(key string) string {
	rest, ok := strings.CutPrefix(key, "svc/")
	if !ok {
		return ""
	}
	site, _, _ := strings.Cut(rest, "/")
	return site
}
