// Package telemetry serves a component's operational HTTP endpoints:
// /healthz (the process is alive), /readyz (it can do its job) and /metrics
// (Prometheus). Every meshfed component runs one.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a Prometheus registry with the Go runtime and process
// collectors, which every component wants.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Options configures a Server.
type Options struct {
	// Listen is the address to serve on, for example 127.0.0.1:9090.
	Listen   string
	Registry *prometheus.Registry
	// Ready reports why the component is not ready, or nil.
	Ready func() error
	// Degraded, when set, says what is wrong with a component that still
	// does its job (a spoke serving its source's last valid content); ""
	// when nothing is. /readyz stays 200 and says it.
	Degraded func() string
	// Handlers are extra paths the component serves (for example a spoke's
	// view of the catalog).
	Handlers map[string]http.Handler
	Logger   *slog.Logger
}

// Server is the operational HTTP server.
type Server struct {
	o  Options
	ln net.Listener
}

// Listen binds the address, so callers learn a :0 port before Run.
func Listen(o Options) (*Server, error) {
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("telemetry: listen %s: %w", o.Listen, err)
	}
	return &Server{o: o, ln: ln}, nil
}

// Addr is the bound address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.o.Ready != nil {
			if err := s.o.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		if s.o.Degraded != nil {
			if msg := s.o.Degraded(); msg != "" {
				fmt.Fprintln(w, "ok, degraded: "+msg)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(s.o.Registry, promhttp.HandlerOpts{}))
	for p, h := range s.o.Handlers {
		mux.Handle(p, h)
	}
	return Serve(ctx, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, s.ln)
}

// Serve runs srv on ln (with TLS when srv.TLSConfig is set) until ctx
// ends, then shuts it down, letting requests in flight finish for up to 5s.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	var err error
	if srv.TLSConfig != nil {
		err = srv.ServeTLS(ln, "", "")
	} else {
		err = srv.Serve(ln)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	}
	return nil
}
