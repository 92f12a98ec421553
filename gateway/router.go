package gateway

import (
	"errors"
	"fmt"
	"net"

	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/meshfed/meshfed/dataplane/sni"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
)

// The gateway routes a connection by the SNI of its ClientHello, which it
// reads without decrypting, to a local endpoint of that service; the
// hello and everything after pass on unchanged. Anything without a route
// is closed: the gateway relays nothing else.

// route is the routed listener's decision on what a caller sent so far.
func (g *Gateway) route(hello []byte, remote func() net.Addr) (xdsclient.Route, error) {
	name, _, err := sni.Parse(hello)
	if errors.Is(err, sni.ErrIncomplete) {
		return xdsclient.Route{}, loop.ErrMore
	}
	if err != nil {
		return xdsclient.Route{}, &loop.Refusal{Reason: helloResult(err), Err: err}
	}
	var r xdsclient.Route
	ok := false
	if lc := g.routes.Load(); lc != nil {
		r, ok = lc.SNI[name]
	}
	if !ok {
		g.log.Info("gateway refused an SNI it has no route for", "sni", name, "remote", remote())
		return xdsclient.Route{}, &loop.Refusal{Reason: "unknown_sni", Err: fmt.Errorf("no route for %q", name)}
	}
	return r, nil
}

// helloResult names why a ClientHello was refused, for the metrics.
func helloResult(err error) string {
	switch {
	case errors.Is(err, sni.ErrTooLarge):
		return "oversized"
	case errors.Is(err, sni.ErrNoSNI):
		return "no_sni"
	case errors.Is(err, sni.ErrNotTLS):
		return "not_tls"
	}
	return "malformed"
}
