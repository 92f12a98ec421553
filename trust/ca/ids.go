package ca

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The paths of meshfed's own identities in the federation trust domain.
const (
	spokePrefix = "/meshfed/spoke/"
	adminPath   = "/meshfed/admin"
	// HubPath is the hub's SPIFFE ID path (in the federation's trust
	// domain); SiteSpokePath a spoke's in its own site's trust domain,
	// where it serves its identity and xDS APIs.
	HubPath       = "/meshfed/hub"
	SiteSpokePath = "/meshfed/spoke"
)

// SpokeID is the identity of site's spoke.
func SpokeID(federation spiffeid.TrustDomain, site string) (spiffeid.ID, error) {
	return spiffeid.FromPath(federation, spokePrefix+site)
}

// AdminID is the identity of the federation's administrator (the CLI).
func AdminID(federation spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(federation, adminPath)
}

// HubID is the identity of the hub.
func HubID(federation spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(federation, HubPath)
}

// SiteOfSpoke returns the site a spoke ID is for, or an error when id is
// not a spoke of federation.
func SiteOfSpoke(federation spiffeid.TrustDomain, id spiffeid.ID) (string, error) {
	if id.TrustDomain() != federation || !strings.HasPrefix(id.Path(), spokePrefix) {
		return "", fmt.Errorf("%s is not a spoke of federation %s", id, federation)
	}
	return strings.TrimPrefix(id.Path(), spokePrefix), nil
}

// IsAdmin reports whether id is the federation's administrator.
func IsAdmin(federation spiffeid.TrustDomain, id spiffeid.ID) bool {
	return id == AdminID(federation)
}
