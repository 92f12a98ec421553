//go:build !linux

package proxy

import (
	"net"
	"time"

	"github.com/meshfed/meshfed/gateway/clienthello"
)

// Elsewhere than Linux a gateway listener serves each connection on a
// goroutine of its own.
func (p *Proxy) listenGateway(rl *runningListener, _ string) (listener, error) {
	return p.listen(rl, p.passthrough)
}

func (p *Proxy) passthrough(lc *listenerConf, down net.Conn) {
	p.m.gatewayLive.Inc()
	defer p.m.gatewayLive.Dec()
	_ = down.SetReadDeadline(time.Now().Add(p.o.HelloTimeout))
	name, raw, err := clienthello.Read(down)
	if err != nil {
		p.refused(helloResult(err), err, down.RemoteAddr)
		return
	}
	_ = down.SetReadDeadline(time.Time{})
	r, ok := lc.sni[name]
	if !ok {
		p.refusedSNI(name, down.RemoteAddr())
		return
	}
	up, result := p.connect(r.cluster, r.attempts)
	if up == nil {
		p.m.gateway.WithLabelValues(result).Inc()
		return
	}
	if _, err := up.Write(raw); err != nil {
		up.Close()
		p.m.gateway.WithLabelValues("upstream_failure").Inc()
		return
	}
	p.m.gateway.WithLabelValues("ok").Inc()
	p.relay(down, up)
}
