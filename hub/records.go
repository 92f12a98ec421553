package hub

import (
	"time"

	"github.com/meshfed/meshfed/catalog"
)

// Store key prefixes.
const (
	keyCA       = "ca"
	keySites    = "sites/"
	keyTokens   = "tokens/"
	keyResource = "catalog/"
)

// siteRecord is a site as stored.
type siteRecord struct {
	Site     catalog.Site `json:"site"`
	Created  time.Time    `json:"created"`
	LastSync time.Time    `json:"lastSync,omitzero"`
}

// tokenRecord is a join token as stored: only a hash of its secret.
type tokenRecord struct {
	Site       string    `json:"site"`
	SecretHash string    `json:"secretHash"`
	Expires    time.Time `json:"expires"`
	Used       time.Time `json:"used,omitzero"`
}

// caRecord is the federation CA as stored.
type caRecord struct {
	Federation string `json:"federation"`
	CertPEM    string `json:"cert"`
	KeyPEM     string `json:"key"`
}
