package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// resources is what the node holds of each type, by name.
type resources struct {
	listeners map[string]*listenerv3.Listener
	clusters  map[string]*clusterv3.Cluster
	endpoints map[string]*endpointv3.ClusterLoadAssignment
	secrets   map[string]*tlsv3.Secret
}

// xdsClient keeps one ADS stream (state of the world) to the spoke and
// hands every complete, consistent set of resources to update.
type xdsClient struct {
	conn   *grpc.ClientConn
	node   *corev3.Node
	log    *slog.Logger
	update func(*resources) error
	onNack func(typ string)
	// secrets are the SDS names to ask for: all the spoke may send.
	secrets []string
}

func (c *xdsClient) run(ctx context.Context) error {
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
		c.log.Warn("xDS stream ended; keeping the last configuration and retrying", "err", err, "retry_in", backoff)
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

func (c *xdsClient) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(c.conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	res := &resources{
		listeners: map[string]*listenerv3.Listener{}, clusters: map[string]*clusterv3.Cluster{},
		endpoints: map[string]*endpointv3.ClusterLoadAssignment{}, secrets: map[string]*tlsv3.Secret{},
	}
	state := map[string]*typeState{
		resource.ListenerType: {}, resource.ClusterType: {},
		resource.SecretType: {names: c.secrets}, resource.EndpointType: {},
	}
	send := func(typ string, nack *status.Status) error {
		st := state[typ]
		return stream.Send(&discoveryv3.DiscoveryRequest{
			Node: c.node, TypeUrl: typ, VersionInfo: st.version, ResponseNonce: st.nonce,
			ResourceNames: st.names, ErrorDetail: nack,
		})
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.SecretType} {
		if err := send(typ, nil); err != nil {
			return err
		}
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		typ := resp.GetTypeUrl()
		st, ok := state[typ]
		if !ok {
			continue
		}
		st.nonce = resp.GetNonce()
		if err := decode(res, typ, resp); err != nil {
			c.log.Error("refused an xDS response", "type", typ, "err", err)
			if c.onNack != nil {
				c.onNack(typ)
			}
			if err := send(typ, &status.Status{Code: 3, Message: err.Error()}); err != nil {
				return err
			}
			continue
		}
		st.version = resp.GetVersionInfo()
		if err := send(typ, nil); err != nil {
			return err
		}
		if typ == resource.ClusterType {
			// Ask for the endpoints of every EDS cluster.
			names := edsNames(res.clusters)
			es := state[resource.EndpointType]
			if fmt.Sprint(names) != fmt.Sprint(es.names) {
				es.names = names
				for n := range res.endpoints {
					if !contains(names, n) {
						delete(res.endpoints, n)
					}
				}
				if err := send(resource.EndpointType, nil); err != nil {
					return err
				}
			}
		}
		if complete(res) {
			if err := c.update(res); err != nil {
				c.log.Error("could not apply the configuration", "err", err)
			}
		}
	}
}

func contains(names []string, n string) bool {
	i := sort.SearchStrings(names, n)
	return i < len(names) && names[i] == n
}

func edsNames(cs map[string]*clusterv3.Cluster) []string {
	var out []string
	for _, c := range cs {
		if c.GetType() == clusterv3.Cluster_EDS {
			out = append(out, edsName(c))
		}
	}
	sort.Strings(out)
	return out
}

func edsName(c *clusterv3.Cluster) string {
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
		if c.GetType() == clusterv3.Cluster_EDS && r.endpoints[edsName(c)] == nil {
			return false
		}
	}
	return true
}

// decode replaces the resources of typ with the response's (state of the
// world: a response holds all of them).
func decode(r *resources, typ string, resp *discoveryv3.DiscoveryResponse) error {
	switch typ {
	case resource.ListenerType:
		m, err := unpackAll[*listenerv3.Listener](resp, func() *listenerv3.Listener { return &listenerv3.Listener{} })
		if err == nil {
			r.listeners = m
		}
		return err
	case resource.ClusterType:
		m, err := unpackAll[*clusterv3.Cluster](resp, func() *clusterv3.Cluster { return &clusterv3.Cluster{} })
		if err == nil {
			r.clusters = m
		}
		return err
	case resource.EndpointType:
		m, err := unpackAll[*endpointv3.ClusterLoadAssignment](resp, func() *endpointv3.ClusterLoadAssignment { return &endpointv3.ClusterLoadAssignment{} })
		for k, v := range m {
			r.endpoints[k] = v
		}
		return err
	case resource.SecretType:
		m, err := unpackAll[*tlsv3.Secret](resp, func() *tlsv3.Secret { return &tlsv3.Secret{} })
		if err == nil {
			r.secrets = m
		}
		return err
	}
	return nil
}

type named interface {
	proto.Message
	Validate() error
}

func unpackAll[T named](resp *discoveryv3.DiscoveryResponse, fresh func() T) (map[string]T, error) {
	out := map[string]T{}
	for _, a := range resp.GetResources() {
		m := fresh()
		if err := a.UnmarshalTo(m); err != nil {
			return nil, fmt.Errorf("decode %s: %w", a.GetTypeUrl(), err)
		}
		if err := m.Validate(); err != nil {
			return nil, err
		}
		out[resourceName(m)] = m
	}
	return out, nil
}

func resourceName(m proto.Message) string {
	switch v := m.(type) {
	case *listenerv3.Listener:
		return v.GetName()
	case *clusterv3.Cluster:
		return v.GetName()
	case *endpointv3.ClusterLoadAssignment:
		return v.GetClusterName()
	case *tlsv3.Secret:
		return v.GetName()
	}
	return ""
}
