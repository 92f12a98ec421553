// Package gateway is the east-west gateway (`meshfed gateway`): TLS
// passthrough by SNI to local endpoints of exported services, fed over xDS
// by its spoke and run on the data-plane engine's routed event loops
// (dataplane/loop), never an open relay;
// and the site's presence in the WAN gossip pool, whose failure tells every
// other site to fail over.
package gateway
