package federation

import (
	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/gossip"
)

// KeyringFromWire converts the wire keyring for a gossip pool.
func KeyringFromWire(k *meshfedv1.GossipKeyring) gossip.Keyring {
	return gossip.Keyring{Keys: k.GetKeys(), UseNewestAfter: k.GetUseNewestAfter().AsTime()}
}

// GossipSeeds are the spokes' gossip addresses from the status records in
// t, but for site's own.
func GossipSeeds(t *Table, site string) []string {
	var out []string
	for _, r := range t.List("status/") {
		if st := r.GetSourceStatus(); st.GetSite() != site {
			out = append(out, st.GetGossipAddresses()...)
		}
	}
	return out
}
