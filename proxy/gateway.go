package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"

	"github.com/meshfed/meshfed/gateway/clienthello"
)

// A gateway listener routes a connection by the SNI of its ClientHello,
// which it reads without decrypting, to a local endpoint of that service;
// the hello and everything after pass on unchanged. Anything without a
// route is closed: the gateway relays nothing else.

// helloResult names why a ClientHello was refused, for the metrics.
func helloResult(err error) string {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return "hello_timeout"
	case errors.Is(err, clienthello.ErrTooLarge):
		return "oversized"
	case errors.Is(err, clienthello.ErrNoSNI):
		return "no_sni"
	case errors.Is(err, clienthello.ErrNotTLS):
		return "not_tls"
	}
	return "malformed"
}

// refused counts a gateway connection closed before it was routed.
func (p *Proxy) refused(result string, err error, remote func() net.Addr) {
	p.m.gateway.WithLabelValues(result).Inc()
	if p.log.Enabled(context.Background(), slog.LevelDebug) {
		p.log.Debug("gateway refused a connection", "remote", remote(), "reason", result, "err", err)
	}
}

// refusedSNI counts a ClientHello naming a server with no route here.
func (p *Proxy) refusedSNI(name string, remote net.Addr) {
	p.m.gateway.WithLabelValues("unknown_sni").Inc()
	p.log.Info("gateway refused an SNI it has no route for", "sni", name, "remote", remote)
}
