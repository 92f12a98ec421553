package loop

import (
	"errors"
	"log/slog"
	"net"
	"time"

	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/prometheus/client_golang/prometheus"
)

// RouterOptions configures a routed listener (ListenRouted): each
// connection is accepted, its first bytes read until Route says where it
// goes, then connected to an endpoint of that cluster, the bytes replayed
// and the rest relayed unchanged. The gateway routes this way by SNI.
type RouterOptions struct {
	// Loops is how many event loops accept and relay (Linux), each on a
	// listening socket of its own. Required.
	Loops int
	// HelloTimeout bounds how long a caller may take to send what Route
	// needs. Required.
	HelloTimeout time.Duration
	// MaxHello bounds how many bytes are read before Route decides.
	// Required.
	MaxHello int
	// Route is given the bytes a caller has sent so far (and its address,
	// for logs): the route, ErrMore to wait for more, or a Refusal.
	Route func(hello []byte, remote func() net.Addr) (xdsclient.Route, error)
	// Upstreams are the clusters routes lead to. Required.
	Upstreams *upstream.Set
	// Tracker counts the live connections, for the node's drain.
	Tracker *Tracker
	// Gauge counts running loops; Live the connections held now;
	// Results connections by result (ok, or why refused); AcceptPaused
	// pauses in accepting for want of file descriptors.
	Gauge        prometheus.Gauge
	Live         prometheus.Gauge
	Results      *prometheus.CounterVec
	AcceptPaused prometheus.Counter
	Logger       *slog.Logger
}

// Listener is a running listener: its address, and Close, which stops
// accepting (live connections go on).
type Listener interface {
	Addr() net.Addr
	Close() error
}

// ErrMore is Route's answer when the bytes so far are not enough.
var ErrMore = errors.New("loop: more bytes needed to route")

// Refusal is Route's answer for a connection that has no route: Reason is
// the result it is counted under.
type Refusal struct {
	Reason string
	Err    error
}

func (r *Refusal) Error() string { return r.Reason + ": " + r.Err.Error() }

func (r *Refusal) Unwrap() error { return r.Err }

// refusalReason is the result a Route error is counted under.
func refusalReason(err error) string {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Reason
	}
	return "malformed"
}
