// Package xds builds a site's data-plane configuration as Envoy v3
// resources and serves it over ADS (state of the world and delta) with
// go-control-plane, to meshfed proxies, Envoy and proxyless gRPC clients.
//
// Names, which users and the gateway see:
//
//	listener   <name>.<namespace>:<port>              (also the xds:/// target)
//	cluster    outbound|<port>|<subset>|<name>.<namespace>  (subset "" = all endpoints)
//	inbound    inbound|<address>:<port>, cluster inbound|<port>
//	secrets    "default" (the node's SVID), "federation" (every trust domain's bundle)
//	SNI        [<subset>.]<port>.<name>.<namespace>.<site>.<federation>
package xds

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"net/netip"
	"sort"
	"strconv"

	"github.com/meshfed/meshfed/catalog"
)

// Secret names.
const (
	SecretSVID       = "default"
	SecretFederation = "federation"
)

// GRPCCertProvider is the certificate provider instance a proxyless gRPC
// client's bootstrap must define (`meshfed proxy bootstrap --grpc` writes
// it): its clusters take the client's SVID and the federation's roots from
// there.
const GRPCCertProvider = "meshfed"

// GRPCServerListenerPrefix names the listener of a proxyless gRPC server's
// endpoint: the prefix, then host:port. Its bootstrap's
// server_listener_resource_name_template is the prefix and "%s".
const GRPCServerListenerPrefix = "meshfed/inbound/"

// MetadataNamespace is the filter-metadata key of meshfed's endpoint
// metadata ("site", "sni").
const MetadataNamespace = "meshfed"

// ListenerName names the outbound listener of a service port; proxyless
// gRPC clients dial xds:///<ListenerName>.
func ListenerName(namespace, name string, port uint32) string {
	return fmt.Sprintf("%s.%s:%d", name, namespace, port)
}

// ClusterName names the cluster of a service port's subset ("" for all).
func ClusterName(namespace, name string, port uint32, subset string) string {
	return fmt.Sprintf("outbound|%d|%s|%s.%s", port, subset, name, namespace)
}

// SNI is the server name a caller sends to reach a service port's subset in
// site: the site's gateway routes by it without decrypting.
func SNI(federation, site, namespace, name string, port uint32, subset string) string {
	s := fmt.Sprintf("%d.%s.%s.%s.%s", port, name, namespace, site, federation)
	if subset != "" {
		s = subset + "." + s
	}
	return s
}

// InboundClusterName names the cluster that leads to the local app.
func InboundClusterName(port uint32) string { return "inbound|" + strconv.Itoa(int(port)) }

// AssignVIPs gives every service ID an address in prefix: a hash of the ID,
// moved on to the next free address on a collision (IDs in sorted order, so
// every proxy of a site agrees). More IDs than addresses: the rest get none.
func AssignVIPs(prefix netip.Prefix, ids []string) map[string]netip.Addr {
	out := map[string]netip.Addr{}
	if !prefix.IsValid() || !prefix.Addr().Is4() {
		return out
	}
	bits := 32 - prefix.Bits()
	if bits < 2 {
		return out
	}
	size := uint32(1) << bits
	base := binary.BigEndian.Uint32(prefix.Masked().Addr().AsSlice())
	sorted := append([]string(nil), ids...)
	sort.Strings(sorted)
	used := map[uint32]bool{}
	for _, id := range sorted {
		if uint32(len(used)) >= size-2 {
			break
		}
		h := fnv.New32a()
		h.Write([]byte(id))
		off := h.Sum32() % size
		for off == 0 || off == size-1 || used[off] {
			off = (off + 1) % size
		}
		used[off] = true
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], base+off)
		out[id] = netip.AddrFrom4(b)
	}
	return out
}

// ServiceAddrs gives every service of services (by ID, across sites) the
// address a node with outbound prefix gets its listeners at: what
// AssignVIPs gives it from the same IDs, as the builder does.
func ServiceAddrs(services []catalog.Service, prefix netip.Prefix) map[string]netip.Addr {
	seen := map[string]bool{}
	var ids []string
	for _, s := range services {
		if !seen[s.ID()] {
			seen[s.ID()] = true
			ids = append(ids, s.ID())
		}
	}
	return AssignVIPs(prefix, ids)
}

func parsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, fmt.Errorf("%q: want a CIDR such as 127.128.0.0/9", s)
	}
	return p, nil
}
