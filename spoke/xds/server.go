package xds

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/siteca"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpccreds "google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Node metadata keys a client sets to describe itself.
const (
	MetaAddress        = "meshfed.address"
	MetaInbound        = "meshfed.inbound"
	MetaOutboundPrefix = "meshfed.outbound_prefix"
	MetaGatewayListen  = "meshfed.gateway_listen"
)

// Options configures a Server.
type Options struct {
	// Listen is the xDS address. Required.
	Listen string
	// CA is the site CA: it signs the server's certificate and the SVIDs
	// handed to nodes over SDS, and its authorities check node certificates.
	CA *siteca.SiteCA
	// Catalog returns the current catalog to build from.
	Catalog func() *Catalog
	// ResolveEvery is how often other sites' gateway host names are looked
	// up for nodes that take only IP addresses (default
	// DefaultResolveEvery).
	ResolveEvery time.Duration
	Logger       *slog.Logger
	Registry     prometheus.Registerer
}

// Server serves the site's xDS over ADS, state of the world and delta.
// Clients authenticate with an SVID of the site: a node's ID must be its
// SPIFFE ID, and only it gets its SVID over SDS.
type Server struct {
	o     Options
	log   *slog.Logger
	ln    net.Listener
	cache caches
	kick  chan struct{}
	res   *resolver

	rebuildMu sync.Mutex

	mu      sync.Mutex
	streams map[int64]string // stream → the peer's SPIFFE ID
	seen    map[int64]string // stream → node key, once it named its node
	nodes   map[string]*nodeState

	pushes       prometheus.Counter
	inconsistent prometheus.Counter
	refused      prometheus.Counter
	gauge        prometheus.GaugeFunc
}

type nodeState struct {
	node    Node
	streams int
	svid    SVID
	expires time.Time
	signer  []byte
	version map[resource.Type]string
}

// New binds the xDS listener.
func New(o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("xds: listen %s: %w", o.Listen, err)
	}
	s := &Server{
		o: o, log: o.Logger.With("component", "xds"), ln: ln, kick: make(chan struct{}, 1),
		streams: map[int64]string{}, seen: map[int64]string{}, nodes: map[string]*nodeState{},
	}
	s.res = newResolver(o.ResolveEvery, s.log, s.Changed)
	s.cache = caches{
		ads:  cachev3.NewSnapshotCache(true, nodeHash{}, logAdapter{s.log}),
		grpc: cachev3.NewSnapshotCache(false, nodeHash{}, logAdapter{s.log}),
	}
	s.pushes = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_xds_pushes_total", Help: "Snapshots built and set for xDS nodes."})
	s.inconsistent = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_xds_inconsistent_snapshots_total", Help: "Snapshots refused before they were set: an EDS cluster without its endpoints, or endpoints no cluster names; the node kept its last one."})
	s.refused = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_xds_refused_streams_total", Help: "xDS streams refused: a node ID that is not the caller's SPIFFE ID."})
	s.gauge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshfed_xds_nodes", Help: "xDS nodes connected."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.nodes))
	})
	if o.Registry != nil {
		o.Registry.MustRegister(s.pushes, s.inconsistent, s.refused, s.gauge, s.res.lookups)
	}
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Changed tells the server the catalog changed; it rebuilds every node's
// snapshot soon after (changes in a burst are built once).
func (s *Server) Changed() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	tc := s.o.CA.ServerTLS(s.servingCert(), tls.RequireAndVerifyClientCert)
	gs := grpc.NewServer(
		grpc.Creds(grpccreds.NewTLS(tc)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	xs := serverv3.NewServer(ctx, s.cache, s.callbacks())
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, xs)
	secretv3.RegisterSecretDiscoveryServiceServer(gs, xs)
	// Every goroutine of the server ends before Run returns.
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { s.rebuildLoop(ctx); return nil })
	g.Go(func() error { s.res.run(ctx); return nil })
	g.Go(func() error {
		<-ctx.Done()
		gs.Stop()
		return nil
	})
	g.Go(func() error {
		s.log.Info("xDS serving", "addr", s.Addr())
		if err := gs.Serve(s.ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("xds: %w", err)
		}
		return nil
	})
	return g.Wait()
}

// servingCert returns the server's certificate: an SVID of the site that
// also names the listen host, so clients that check host names (gRPC's
// xDS bootstrap TLS credentials) accept it. Reissued at half-life.
func (s *Server) servingCert() func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	var mu sync.Mutex
	var cur *tls.Certificate
	return func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		signer := s.o.CA.Cert()
		if ca.Current(cur, signer, time.Now()) {
			return cur, nil
		}
		key, err := ca.NewKey()
		if err != nil {
			return nil, err
		}
		leaf := ca.Leaf{ID: spiffeid.RequireFromPath(s.o.CA.TrustDomain(), ca.SiteSpokePath), Key: key.Public(), DNSNames: []string{"localhost"}}
		if h, err := os.Hostname(); err == nil {
			leaf.DNSNames = append(leaf.DNSNames, h)
		}
		host, _, _ := net.SplitHostPort(s.Addr())
		if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
			leaf.IPs = append(leaf.IPs, ip)
		} else {
			leaf.IPs = append(leaf.IPs, net.IPv4(127, 0, 0, 1), net.IPv6loopback)
		}
		cert, err := s.o.CA.Sign(leaf)
		if err != nil {
			return nil, err
		}
		cur = &tls.Certificate{Certificate: [][]byte{cert.Raw, signer.Raw}, PrivateKey: key, Leaf: cert}
		return cur, nil
	}
}

func (s *Server) callbacks() serverv3.Callbacks {
	// State-of-the-world and delta streams are numbered apart, from 1
	// each: delta streams are kept under their negated number.
	open := func(sign int64) func(context.Context, int64, string) error {
		return func(ctx context.Context, id int64, _ string) error {
			pid, err := peerID(ctx, s.o.CA.TrustDomain())
			if err != nil {
				s.refused.Inc()
				return err
			}
			s.mu.Lock()
			s.streams[sign*id] = pid
			s.mu.Unlock()
			return nil
		}
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc:        open(1),
		DeltaStreamOpenFunc:   open(-1),
		StreamClosedFunc:      func(id int64, _ *corev3.Node) { s.closeStream(id) },
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { s.closeStream(-id) },
		StreamRequestFunc: func(id int64, req *discoveryv3.DiscoveryRequest) error {
			return s.request(id, req.GetNode())
		},
		StreamDeltaRequestFunc: func(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
			return s.request(-id, req.GetNode())
		},
	}
}

// peerID is the caller's SPIFFE ID from its verified client certificate.
func peerID(ctx context.Context, td spiffeid.TrustDomain) (string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "xds: no peer")
	}
	ti, ok := p.AuthInfo.(grpccreds.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 {
		return "", status.Error(codes.Unauthenticated, "xds: connect with an SVID of this site as client certificate")
	}
	id, err := ca.SPIFFEID(ti.State.VerifiedChains[0][0])
	if err != nil || id.TrustDomain() != td {
		return "", status.Errorf(codes.PermissionDenied, "xds: not an SVID of %s", td)
	}
	return id.String(), nil
}

// request registers the stream's node at its first request: the node ID
// must be the caller's SPIFFE ID. Its snapshot is built before the cache
// answers, so the first response carries everything.
func (s *Server) request(id int64, n *corev3.Node) error {
	s.mu.Lock()
	if _, ok := s.seen[id]; ok {
		s.mu.Unlock()
		return nil
	}
	pid := s.streams[id]
	s.mu.Unlock()
	if n == nil {
		return status.Error(codes.InvalidArgument, "xds: the first request names no node")
	}
	if n.GetId() != pid {
		s.refused.Inc()
		s.log.Warn("refused an xDS stream: its node ID is not its SPIFFE ID", "node", n.GetId(), "peer", pid)
		return status.Errorf(codes.PermissionDenied, "xds: node ID %q must be the caller's SPIFFE ID %s", n.GetId(), pid)
	}
	node, err := parseNode(n)
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	key := nodeHash{}.ID(n)
	s.rebuildMu.Lock() // rebuild reads st.node under it
	s.mu.Lock()
	s.seen[id] = key
	st := s.nodes[key]
	if st == nil {
		st = &nodeState{}
		s.nodes[key] = st
	}
	// The newest stream's word stands: a proxy that changes its inbound
	// apps opens a new stream while the old one is still closing.
	st.node = node
	st.streams++
	s.mu.Unlock()
	s.rebuildMu.Unlock()
	s.rebuild([]string{key}, s.o.Catalog())
	return nil
}

func (s *Server) closeStream(id int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.streams, id)
	key, ok := s.seen[id]
	if !ok {
		return
	}
	delete(s.seen, id)
	if st := s.nodes[key]; st != nil {
		st.streams--
		if st.streams <= 0 {
			delete(s.nodes, key)
			s.cache.of(st.node.GRPC).ClearSnapshot(key)
		}
	}
}

// isGRPC tells a proxyless gRPC client by its user agent ("gRPC Go",
// "gRPC Java", …).
func isGRPC(n *corev3.Node) bool {
	return strings.HasPrefix(strings.ToLower(n.GetUserAgentName()), "grpc")
}

// caches holds the nodes' snapshots. Envoy and meshfed proxies get an
// ADS-mode cache, which orders responses across types and answers a
// request by name only once it names everything the snapshot holds (they
// ask for all of it). gRPC clients ask for one listener and the clusters
// it needs by name; an ADS-mode cache would never answer them while the
// site has more, so theirs is a plain one, which answers with what was
// asked for.
type caches struct{ ads, grpc cachev3.SnapshotCache }

func (c caches) of(grpc bool) cachev3.SnapshotCache {
	if grpc {
		return c.grpc
	}
	return c.ads
}

// The server asks the cache with each request, its node filled in from
// the stream's first request.

func (c caches) CreateWatch(r *cachev3.Request, sub cachev3.Subscription, ch chan cachev3.Response) (func(), error) {
	return c.of(isGRPC(r.GetNode())).CreateWatch(r, sub, ch)
}

func (c caches) CreateDeltaWatch(r *cachev3.DeltaRequest, sub cachev3.Subscription, ch chan cachev3.DeltaResponse) (func(), error) {
	return c.of(isGRPC(r.GetNode())).CreateDeltaWatch(r, sub, ch)
}

func (c caches) Fetch(ctx context.Context, r *cachev3.Request) (cachev3.Response, error) {
	return c.of(isGRPC(r.GetNode())).Fetch(ctx, r)
}

// parseNode reads what a node says about itself.
func parseNode(n *corev3.Node) (Node, error) {
	out := Node{ID: n.GetId(), GRPC: isGRPC(n), IPOnly: strings.EqualFold(n.GetUserAgentName(), "envoy")}
	if l := n.GetLocality(); l.GetRegion() != "" || l.GetZone() != "" {
		out.Locality = catalog.Locality{Region: l.GetRegion(), Zone: l.GetZone()}
	}
	f := n.GetMetadata().GetFields()
	out.Address = f[MetaAddress].GetStringValue()
	if gl := f[MetaGatewayListen].GetStringValue(); gl != "" {
		if err := catalog.ValidateHostPort("node metadata "+MetaGatewayListen, gl); err != nil {
			return out, err
		}
		out.GatewayListen = gl
	}
	if p := f[MetaOutboundPrefix].GetStringValue(); p != "" {
		pfx, err := parsePrefix(p)
		if err != nil {
			return out, fmt.Errorf("node metadata %s: %w", MetaOutboundPrefix, err)
		}
		out.OutboundPrefix = pfx
	}
	if in := f[MetaInbound].GetStructValue(); in != nil {
		out.Inbound = map[uint32]string{}
		for k, v := range in.GetFields() {
			var port uint32
			if _, err := fmt.Sscan(k, &port); err != nil || port == 0 || port > 65535 {
				return out, fmt.Errorf("node metadata %s: %q is no port", MetaInbound, k)
			}
			if err := catalog.ValidateHostPort("inbound app address", v.GetStringValue()); err != nil {
				return out, err
			}
			out.Inbound[port] = v.GetStringValue()
		}
	}
	return out, nil
}

func (s *Server) rebuildLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
			// Let a burst of changes settle.
			select {
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		case <-t.C:
			// SVIDs due for renewal or signed by a retired CA.
			if !s.svidsDue() {
				continue
			}
		}
		s.mu.Lock()
		keys := make([]string, 0, len(s.nodes))
		for k := range s.nodes {
			keys = append(keys, k)
		}
		s.mu.Unlock()
		s.rebuild(keys, s.o.Catalog())
	}
}

func (s *Server) svidsDue() bool {
	signer := s.o.CA.Cert().Raw
	s.rebuildMu.Lock() // refreshSVID writes the node's SVID under it
	defer s.rebuildMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.nodes {
		if !st.node.GRPC && (time.Now().After(st.expires) || string(st.signer) != string(signer)) {
			return true
		}
	}
	return false
}

// rebuild sets the snapshots of the nodes keys from c. Streams and the
// rebuild loop call it: one at a time, as it renews node SVIDs.
func (s *Server) rebuild(keys []string, c *Catalog) {
	s.rebuildMu.Lock()
	defer s.rebuildMu.Unlock()
	ctx := context.Background()
	c = s.withResolved(c)
	for _, key := range keys {
		s.mu.Lock()
		st := s.nodes[key]
		s.mu.Unlock()
		if st == nil {
			continue
		}
		if err := s.refreshSVID(st); err != nil {
			s.log.Error("could not issue a node's SVID", "node", st.node.ID, "err", err)
		}
		snap, versions, err := snapshot(Build(c, st.node, st.svid))
		if err != nil {
			// The node keeps what it has: a snapshot Envoy would refuse
			// is a bug here, not something to push.
			s.inconsistent.Inc()
			s.log.Error("refused to push an inconsistent snapshot; the node keeps its last one", "node", st.node.ID, "err", err)
			continue
		}
		if maps.Equal(versions, st.version) {
			continue
		}
		if err := s.cache.of(st.node.GRPC).SetSnapshot(ctx, key, snap); err != nil {
			s.log.Error("could not set a node's snapshot", "node", st.node.ID, "err", err)
			continue
		}
		s.mu.Lock()
		st.version = versions
		s.mu.Unlock()
		s.pushes.Inc()
	}
}

// snapshotTypes are the resource types a node's snapshot holds.
var snapshotTypes = []resource.Type{resource.ListenerType, resource.ClusterType, resource.EndpointType, resource.SecretType}

// snapshot makes a node's snapshot of res, each type versioned by the hash
// of its resources (a push resends only the types that changed), and
// checks it as go-control-plane's cache would have the caller do:
// NewSnapshot refuses unknown types, Consistent that every EDS cluster has
// its endpoints and nothing else is sent.
func snapshot(res map[resource.Type][]types.Resource) (*cachev3.Snapshot, map[resource.Type]string, error) {
	for typ := range res {
		if !slices.Contains(snapshotTypes, typ) {
			return nil, nil, fmt.Errorf("snapshot: resources of type %s, which a node's snapshot does not hold", typ)
		}
	}
	snap, err := cachev3.NewSnapshot("", res)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot: %w", err)
	}
	versions := map[resource.Type]string{}
	for _, typ := range snapshotTypes {
		v := hashResources(res[typ])
		versions[typ] = v
		snap.Resources[cachev3.GetResponseType(typ)].Version = v
	}
	if err := snap.Consistent(); err != nil {
		return nil, nil, fmt.Errorf("snapshot: %w", err)
	}
	return snap, versions, nil
}

// withResolved gives c the addresses of the host names in it (hostNames)
// while a node that takes only IP addresses is connected; the resolver
// looks them up only then.
func (s *Server) withResolved(c *Catalog) *Catalog {
	s.mu.Lock()
	ipOnly := false
	for _, st := range s.nodes {
		ipOnly = ipOnly || st.node.IPOnly
	}
	s.mu.Unlock()
	if !ipOnly {
		s.res.resolved(nil)
		return c
	}
	withAddrs := *c
	withAddrs.Resolved = s.res.resolved(hostNames(c))
	return &withAddrs
}

// refreshSVID issues the node's SVID for SDS when it has none, it is past
// half-life, or a new CA signs now. The key is made here and goes only to
// the node, over its authenticated stream.
func (s *Server) refreshSVID(st *nodeState) error {
	signer := s.o.CA.Cert()
	if st.node.GRPC || len(st.svid.CertPEM) > 0 && time.Now().Before(st.expires) && string(st.signer) == string(signer.Raw) {
		return nil
	}
	id, err := spiffeid.FromString(st.node.ID)
	if err != nil {
		return err
	}
	key, err := ca.NewKey()
	if err != nil {
		return err
	}
	cert, err := s.o.CA.SignSVID(key.Public(), id, 0)
	if err != nil {
		return err
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return err
	}
	st.svid = SVID{CertPEM: ca.EncodeCertPEM(cert, signer), KeyPEM: keyPEM}
	st.expires = ca.RenewAt(cert)
	st.signer = signer.Raw
	return nil
}

func hashResources(rs []types.Resource) string {
	names := make([]string, len(rs))
	byName := map[string]types.Resource{}
	for i, r := range rs {
		names[i] = cachev3.GetResourceName(r)
		byName[names[i]] = r
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(byName[n])
		h.Write([]byte(n))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// nodeHash keys snapshots by node ID and what the node says about itself:
// replicas share a SPIFFE ID but not their addresses or zones.
type nodeHash struct{}

func (nodeHash) ID(n *corev3.Node) string {
	if n == nil {
		return ""
	}
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&corev3.Node{
		Locality: n.GetLocality(), Metadata: n.GetMetadata(), UserAgentName: n.GetUserAgentName(),
	})
	sum := sha256.Sum256(b)
	return n.GetId() + "#" + hex.EncodeToString(sum[:6])
}

type logAdapter struct{ l *slog.Logger }

func (a logAdapter) Debugf(string, ...any) {}
func (a logAdapter) Infof(string, ...any)  {}
func (a logAdapter) Warnf(f string, args ...any) {
	msg := fmt.Sprintf(f, args...)
	if strings.HasPrefix(msg, "ADS mode: not responding") {
		// A client asking for endpoints before it saw new clusters: it asks
		// again once it has them. Normal in state-of-the-world ADS.
		a.l.Debug(msg)
		return
	}
	a.l.Warn(msg)
}
func (a logAdapter) Errorf(f string, args ...any) {
	a.l.Error(fmt.Sprintf(f, args...))
}
