package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/meshfed/meshfed/trust/mtls"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// outbound carries one app connection to the service: it picks a subset by
// weight, then endpoints by priority.
func (p *Proxy) outbound(lc *xdsclient.Listener, down net.Conn) {
	if p.o.OutboundFrom != nil {
		if ap, err := netip.ParseAddrPort(down.RemoteAddr().String()); err != nil || !p.o.OutboundFrom(ap.Addr().Unmap()) {
			p.m.downstream.WithLabelValues(lc.Name, "refused_source").Inc()
			down.Close()
			return
		}
	}
	cluster := pickRoute(lc.Routes)
	cfg := p.cfg.Load()
	up, result := p.upstreams.Connect(cluster, lc.Attempts, func(c *xdsclient.Cluster, e xdsclient.Endpoint) (net.Conn, error) {
		return dialUpstream(cfg, c, e)
	})
	if up == nil {
		p.m.downstream.WithLabelValues(lc.Name, result).Inc()
		return
	}
	p.m.downstream.WithLabelValues(lc.Name, "ok").Inc()
	p.m.active.WithLabelValues(cluster).Inc()
	p.relayer.Relay(down, up)
	p.m.active.WithLabelValues(cluster).Dec()
}

func pickRoute(rs []xdsclient.Route) string {
	if len(rs) == 1 {
		return rs[0].Cluster
	}
	total := uint32(0)
	for _, r := range rs {
		total += r.Weight
	}
	if total == 0 {
		return rs[0].Cluster
	}
	n := rand.Uint32N(total)
	for _, r := range rs {
		if n < r.Weight {
			return r.Cluster
		}
		n -= r.Weight
	}
	return rs[len(rs)-1].Cluster
}

// dialUpstream connects to e and completes mTLS: the SNI names the
// service, the peer must chain to a federated bundle and, when the
// cluster lists identities, present one of them.
func dialUpstream(cfg *xdsclient.Config, c *xdsclient.Cluster, e xdsclient.Endpoint) (net.Conn, error) {
	deadline := time.Now().Add(c.ConnectTimeout)
	raw, err := (&net.Dialer{Deadline: deadline}).Dial("tcp", e.Addr)
	if err != nil || !c.TLS {
		return raw, err
	}
	tc := mtls.ClientConfig(cfg.SVID, cfg.Bundles, mtls.AuthorizeOneOf(c.SANs))
	tc.ServerName = e.SNI
	tlsConn := loop.TLSClient(raw, tc)
	_ = raw.SetDeadline(deadline)
	if err := tlsConn.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	_ = raw.SetDeadline(time.Time{})
	return tlsConn, nil
}

// errDenied is the inbound authorizer's refusal of a caller the policy
// does not allow (any other handshake failure is a TLS failure).
var errDenied = errors.New("the policy does not allow this caller")

// inbound terminates mTLS, authorizes the caller by SPIFFE ID and carries
// the connection to the app.
func (p *Proxy) inbound(lc *xdsclient.Listener, raw net.Conn) {
	cfg := p.cfg.Load()
	var caller spiffeid.ID
	tc := mtls.ServerConfig(cfg.SVID, cfg.Bundles, func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		caller = id
		for _, pr := range lc.Allow {
			if pr.Match(id.String()) {
				return nil
			}
		}
		return fmt.Errorf("%w: %s", errDenied, id)
	})
	// The app speaks whatever the caller means to: agree to the caller's
	// first application protocol (a gRPC client insists on h2 being
	// agreed), as the app would if it terminated TLS itself.
	tc.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if len(hello.SupportedProtos) == 0 {
			return nil, nil
		}
		c := tc.Clone()
		c.GetConfigForClient, c.NextProtos = nil, hello.SupportedProtos[:1]
		return c, nil
	}
	down := loop.TLSServer(raw, tc)
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	if err := down.Handshake(); err != nil {
		if errors.Is(err, errDenied) {
			p.m.inbound.WithLabelValues(lc.Name, "denied").Inc()
			p.log.Warn("refused a caller the policy does not allow", "listener", lc.Name, "caller", caller.String())
			return
		}
		p.m.inbound.WithLabelValues(lc.Name, "tls_failure").Inc()
		p.log.Debug("inbound handshake failed", "listener", lc.Name, "remote", raw.RemoteAddr(), "err", err)
		return
	}
	_ = raw.SetDeadline(time.Time{})
	up, err := net.DialTimeout("tcp", lc.App, 5*time.Second)
	if err != nil {
		p.m.inbound.WithLabelValues(lc.Name, "app_unreachable").Inc()
		p.log.Error("the app does not accept connections", "app", lc.App, "err", err)
		return
	}
	p.m.inbound.WithLabelValues(lc.Name, "ok").Inc()
	p.relayer.Relay(down, up)
}
