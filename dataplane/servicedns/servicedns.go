// Package servicedns is the data plane's DNS server for federated service
// names: <name>.<namespace>.svc.clusterset.local (the MCS name) is
// answered with the address of the caller's outbound listener for that
// service; a name in that zone that no listener serves is NXDOMAIN; every
// other name is forwarded to the host's resolvers, so an app pointed at
// this server loses nothing it resolved before.
package servicedns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/errgroup"
)

// Zone is the federated service names' zone.
const Zone = "svc.clusterset.local."

// TTL of an answer: short, so a caller follows a listener that moves
// within seconds, long enough that a busy app does not ask per request.
const TTL = 5

// Lookup returns the address that answers namespace/name for a query from
// src; false: no such federated service for that caller.
type Lookup func(src netip.Addr, namespace, name string) (netip.Addr, bool)

// Options configures a Server.
type Options struct {
	// Listen is the UDP and TCP address served. Required.
	Listen string
	// Lookup answers federated names. Required.
	Lookup Lookup
	// Forward are the resolvers (host:port) other names go to; empty: the
	// nameservers of /etc/resolv.conf.
	Forward []string
	// ForwardTimeout bounds one forwarded query.
	ForwardTimeout time.Duration
	Logger         *slog.Logger
}

// Server is a bound DNS server.
type Server struct {
	o   Options
	log *slog.Logger
	udp net.PacketConn
	tcp net.Listener
	fwd *dns.Client
}

// Listen checks the options and binds the UDP and TCP sockets.
func Listen(o Options) (*Server, error) {
	if o.Listen == "" || o.Lookup == nil {
		return nil, errors.New("servicedns: a listen address and a lookup are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.ForwardTimeout <= 0 {
		o.ForwardTimeout = 2 * time.Second
	}
	if len(o.Forward) == 0 {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("servicedns: no resolvers to forward to (give them, or fix /etc/resolv.conf): %w", err)
		}
		for _, s := range cc.Servers {
			o.Forward = append(o.Forward, net.JoinHostPort(s, cc.Port))
		}
	}
	s := &Server{o: o, log: o.Logger.With("component", "dns"), fwd: &dns.Client{Timeout: o.ForwardTimeout}}
	var err error
	if s.udp, err = net.ListenPacket("udp", o.Listen); err != nil {
		return nil, fmt.Errorf("servicedns: %w", err)
	}
	// TCP on the port UDP got, so ":0" binds one port for both.
	if s.tcp, err = net.Listen("tcp", s.udp.LocalAddr().String()); err != nil {
		s.udp.Close()
		return nil, fmt.Errorf("servicedns: %w", err)
	}
	return s, nil
}

// Addr is the bound address (UDP and TCP).
func (s *Server) Addr() string { return s.udp.LocalAddr().String() }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	h := dns.HandlerFunc(s.serve)
	servers := []*dns.Server{{PacketConn: s.udp, Handler: h}, {Listener: s.tcp, Handler: h}}
	g, ctx := errgroup.WithContext(ctx)
	for _, srv := range servers {
		g.Go(func() error {
			if err := srv.ActivateAndServe(); err != nil && ctx.Err() == nil {
				return fmt.Errorf("servicedns: %w", err)
			}
			return nil
		})
	}
	g.Go(func() error {
		<-ctx.Done()
		for _, srv := range servers {
			_ = srv.Shutdown()
		}
		return nil
	})
	s.log.Info("DNS serving", "listen", s.Addr(), "zone", Zone, "forward", s.o.Forward)
	return g.Wait()
}

func (s *Server) serve(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		m := new(dns.Msg)
		_ = w.WriteMsg(m.SetRcode(req, dns.RcodeFormatError))
		return
	}
	q := req.Question[0]
	qname := strings.ToLower(q.Name)
	if qname != Zone && !strings.HasSuffix(qname, "."+Zone) {
		_ = w.WriteMsg(s.forward(w, req))
		return
	}
	_ = w.WriteMsg(s.answer(src(w.RemoteAddr()), req, qname, q))
}

// answer is the reply for a name in the zone.
func (s *Server) answer(from netip.Addr, req *dns.Msg, qname string, q dns.Question) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	labels := strings.Split(strings.TrimSuffix(qname, "."+Zone), ".")
	var addr netip.Addr
	ok := len(labels) == 2
	if ok {
		addr, ok = s.o.Lookup(from, labels[1], labels[0])
	}
	if !ok {
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{soa()}
		return m
	}
	switch {
	case q.Qtype == dns.TypeA && addr.Is4() || q.Qtype == dns.TypeAAAA && addr.Is6() && !addr.Is4In6():
		m.Answer = []dns.RR{addrRR(q, addr)}
	default:
		// The name exists, with no record of that type (NODATA): a
		// resolver that asks A and AAAA takes the A.
		m.Ns = []dns.RR{soa()}
	}
	return m
}

func addrRR(q dns.Question, addr netip.Addr) dns.RR {
	hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET, Ttl: TTL}
	if addr.Is4() {
		return &dns.A{Hdr: hdr, A: addr.AsSlice()}
	}
	return &dns.AAAA{Hdr: hdr, AAAA: addr.AsSlice()}
}

// soa makes negative answers cacheable for TTL seconds (RFC 2308).
func soa() dns.RR {
	return &dns.SOA{
		Hdr: dns.RR_Header{Name: Zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: TTL},
		Ns:  "ns." + Zone, Mbox: "hostmaster." + Zone, Serial: 1, Refresh: 60, Retry: 10, Expire: 600, Minttl: TTL,
	}
}

// forward asks the host's resolvers in turn; SERVFAIL when none answers.
func (s *Server) forward(w dns.ResponseWriter, req *dns.Msg) *dns.Msg {
	netw := "udp"
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		netw = "tcp"
	}
	var last error
	for _, up := range s.o.Forward {
		c := *s.fwd
		c.Net = netw
		resp, _, err := c.Exchange(req, up)
		if err == nil && resp.Truncated && netw == "udp" {
			c.Net = "tcp"
			resp, _, err = c.Exchange(req, up)
		}
		if err == nil {
			return resp
		}
		last = err
	}
	s.log.Warn("no resolver answered a forwarded query", "name", req.Question[0].Name, "err", last)
	m := new(dns.Msg)
	return m.SetRcode(req, dns.RcodeServerFailure)
}

func src(a net.Addr) netip.Addr {
	if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}
