//go:build !linux

package loop

import (
	"errors"
	"net"
	"time"

	"github.com/meshfed/meshfed/dataplane/xdsclient"
)

// ListenRouted opens a routed listener at addr. Elsewhere than Linux it
// serves each connection on a goroutine of its own.
func ListenRouted(addr string, o *RouterOptions) (Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	go Accept(ln, o.Logger, func(c net.Conn) {
		o.Tracker.Add(c)
		go func() {
			defer o.Tracker.Done(c)
			passthrough(o, c)
		}()
	})
	return ln, nil
}

func passthrough(o *RouterOptions, down net.Conn) {
	o.Live.Inc()
	defer o.Live.Dec()
	refuse := func(reason string, err error) {
		o.Results.WithLabelValues(reason).Inc()
		o.Logger.Debug("gateway refused a connection", "remote", down.RemoteAddr(), "reason", reason, "err", err)
	}
	_ = down.SetReadDeadline(time.Now().Add(o.HelloTimeout))
	hello := make([]byte, 0, o.MaxHello)
	for {
		n, err := down.Read(hello[len(hello):o.MaxHello])
		hello = hello[:len(hello)+n]
		if n > 0 {
			r, rerr := o.Route(hello, down.RemoteAddr)
			if rerr == nil {
				_ = down.SetReadDeadline(time.Time{})
				connectAndRelay(o, down, hello, r.Cluster, r.Attempts)
				return
			}
			if !errors.Is(rerr, ErrMore) {
				refuse(refusalReason(rerr), rerr)
				return
			}
		}
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			refuse("hello_timeout", err)
			return
		case err != nil:
			refuse("malformed", err)
			return
		case len(hello) == o.MaxHello:
			refuse("oversized", errors.New("no route within the bytes allowed"))
			return
		}
	}
}

func connectAndRelay(o *RouterOptions, down net.Conn, hello []byte, cluster string, attempts int) {
	up, result := o.Upstreams.Connect(cluster, attempts, func(c *xdsclient.Cluster, e xdsclient.Endpoint) (net.Conn, error) {
		return net.DialTimeout("tcp", e.Addr, c.ConnectTimeout)
	})
	if up == nil {
		o.Results.WithLabelValues(result).Inc()
		return
	}
	if _, err := up.Write(hello); err != nil {
		up.Close()
		o.Results.WithLabelValues("upstream_failure").Inc()
		return
	}
	o.Results.WithLabelValues("ok").Inc()
	pipe(down, up)
}
