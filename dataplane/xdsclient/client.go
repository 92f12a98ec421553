package xdsclient

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"time"

	xds "github.com/meshfed/meshfed/api/meshfed/xdsapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// The xDS resource types a node asks for, and the ADS method.
const (
	listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	clusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	endpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	secretType   = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
	adsMethod    = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
)

// resources is what the node holds of each type, by name.
type resources struct {
	listeners map[string]*xds.Listener
	clusters  map[string]*xds.Cluster
	endpoints map[string]*xds.ClusterLoadAssignment
	secrets   map[string]*xds.Secret
}

// Client keeps one ADS stream (state of the world) to the spoke and hands
// every complete, consistent set of resources, translated, to Update.
type Client struct {
	// Conn is the connection to the spoke's xDS server (see Dial).
	Conn *grpc.ClientConn
	// Node is what the node says of itself in every request.
	Node *xds.Node
	Log  *slog.Logger
	// Update is given each configuration; an error is logged, and the
	// node keeps what it runs.
	Update func(*Config) error
	// Metrics count refusals and configurations applied; NewMetrics
	// registers them. Required.
	Metrics *Metrics
	// Secrets are the SDS names to ask for: all the spoke may send.
	Secrets []string
}

// Dial connects to the spoke's xDS server at addr with tc (the node's
// SVID; the spoke's identity checked).
func Dial(addr string, tc *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("dial spoke xDS %s: %w", addr, err)
	}
	return conn, nil
}

// Run keeps the stream until ctx ends, reconnecting with backoff; the
// node keeps its last configuration meanwhile.
func (c *Client) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		start := time.Now()
		err := c.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > 10*time.Second {
			backoff = 100 * time.Millisecond
		}
		c.Log.Warn("xDS stream ended; keeping the last configuration and retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

type typeState struct {
	version, nonce string
	names          []string
}

func (c *Client) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, adsMethod)
	if err != nil {
		return err
	}
	res := &resources{
		listeners: map[string]*xds.Listener{}, clusters: map[string]*xds.Cluster{},
		endpoints: map[string]*xds.ClusterLoadAssignment{}, secrets: map[string]*xds.Secret{},
	}
	state := map[string]*typeState{
		listenerType: {}, clusterType: {},
		secretType: {names: c.Secrets}, endpointType: {},
	}
	send := func(typ string, nack *xds.Status) error {
		st := state[typ]
		return stream.SendMsg(&xds.DiscoveryRequest{
			Node: c.Node, TypeUrl: typ, VersionInfo: st.version, ResponseNonce: st.nonce,
			ResourceNames: st.names, ErrorDetail: nack,
		})
	}
	for _, typ := range []string{clusterType, listenerType, secretType} {
		if err := send(typ, nil); err != nil {
			return err
		}
	}
	for {
		resp := &xds.DiscoveryResponse{}
		if err := stream.RecvMsg(resp); err != nil {
			return err
		}
		typ := resp.GetTypeUrl()
		st, ok := state[typ]
		if !ok {
			continue
		}
		st.nonce = resp.GetNonce()
		if err := decode(res, typ, resp); err != nil {
			c.Log.Error("refused an xDS response", "type", typ, "err", err)
			c.nack(typ)
			if err := send(typ, &xds.Status{Code: 3, Message: err.Error()}); err != nil {
				return err
			}
			continue
		}
		st.version = resp.GetVersionInfo()
		if err := send(typ, nil); err != nil {
			return err
		}
		if typ == clusterType {
			// Ask for the endpoints of every EDS cluster.
			names := edsNames(res.clusters)
			es := state[endpointType]
			if !slices.Equal(names, es.names) {
				es.names = names
				for n := range res.endpoints {
					if _, ok := slices.BinarySearch(names, n); !ok {
						delete(res.endpoints, n)
					}
				}
				if err := send(endpointType, nil); err != nil {
					return err
				}
			}
		}
		if complete(res) {
			c.apply(res)
		}
	}
}

// apply translates a complete set of resources and hands it to Update.
func (c *Client) apply(res *resources) {
	cfg, err := translate(res)
	if err != nil {
		c.nack("config")
		c.Log.Error("could not apply the configuration", "err", err)
		return
	}
	if err := c.Update(cfg); err != nil {
		c.Log.Error("could not apply the configuration", "err", err)
		return
	}
	c.Metrics.Configs.Inc()
}

func (c *Client) nack(typ string) { c.Metrics.Nacks.WithLabelValues(typ).Inc() }

func edsNames(cs map[string]*xds.Cluster) []string {
	var out []string
	for _, c := range cs {
		if c.GetType() == xds.Cluster_EDS {
			out = append(out, edsName(c))
		}
	}
	slices.Sort(out)
	return out
}

func edsName(c *xds.Cluster) string {
	if n := c.GetEdsClusterConfig().GetServiceName(); n != "" {
		return n
	}
	return c.GetName()
}

// complete: every EDS cluster has its endpoints and both secrets are here.
func complete(r *resources) bool {
	if r.secrets["default"] == nil || r.secrets["federation"] == nil {
		return false
	}
	for _, c := range r.clusters {
		if c.GetType() == xds.Cluster_EDS && r.endpoints[edsName(c)] == nil {
			return false
		}
	}
	return true
}

// decode replaces the resources of typ with the response's (state of the
// world: a response holds all of them).
func decode(r *resources, typ string, resp *xds.DiscoveryResponse) error {
	switch typ {
	case listenerType:
		m, err := unpackAll[*xds.Listener](resp, func() *xds.Listener { return &xds.Listener{} })
		if err == nil {
			r.listeners = m
		}
		return err
	case clusterType:
		m, err := unpackAll[*xds.Cluster](resp, func() *xds.Cluster { return &xds.Cluster{} })
		if err == nil {
			r.clusters = m
		}
		return err
	case endpointType:
		m, err := unpackAll[*xds.ClusterLoadAssignment](resp, func() *xds.ClusterLoadAssignment { return &xds.ClusterLoadAssignment{} })
		for k, v := range m {
			r.endpoints[k] = v
		}
		return err
	case secretType:
		m, err := unpackAll[*xds.Secret](resp, func() *xds.Secret { return &xds.Secret{} })
		if err == nil {
			r.secrets = m
		}
		return err
	}
	return nil
}

// unpackAll decodes every resource of a response, by name. Resources
// must be of the response's type and named.
func unpackAll[T proto.Message](resp *xds.DiscoveryResponse, fresh func() T) (map[string]T, error) {
	out := map[string]T{}
	for _, a := range resp.GetResources() {
		m := fresh()
		if err := unpack(a, resp.GetTypeUrl(), m); err != nil {
			return nil, err
		}
		name := resourceName(m)
		if name == "" {
			return nil, fmt.Errorf("a %s without a name", resp.GetTypeUrl())
		}
		out[name] = m
	}
	return out, nil
}

// unpack decodes a, which must be of type typ (a type URL), into m.
func unpack(a *anypb.Any, typ string, m proto.Message) error {
	if a.GetTypeUrl() != typ {
		return fmt.Errorf("got a %s where a %s belongs", a.GetTypeUrl(), typ)
	}
	if err := proto.Unmarshal(a.GetValue(), m); err != nil {
		return fmt.Errorf("decode %s: %w", typ, err)
	}
	return nil
}

func resourceName(m proto.Message) string {
	switch v := m.(type) {
	case *xds.Listener:
		return v.GetName()
	case *xds.Cluster:
		return v.GetName()
	case *xds.ClusterLoadAssignment:
		return v.GetClusterName()
	case *xds.Secret:
		return v.GetName()
	}
	return ""
}
