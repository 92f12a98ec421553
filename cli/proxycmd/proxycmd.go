// Package proxycmd is the `proxy` command: part of the meshfed CLI, and
// the whole of the small meshfed-proxy binary, which links nothing else
// (the CLI adds `proxy bootstrap --envoy` and `gateway`, which need Envoy's
// API and the gossip pool).
package proxycmd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/cpuslice"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/proxy"
	"github.com/spf13/cobra"
)

// Flags are what a proxy says about itself to the spoke, shared by
// `proxy` and `proxy bootstrap --envoy`.
type Flags struct {
	XDS, Region, Zone, Address, Outbound string
	inbound                              []string
}

// Register adds the flags to cmd.
func (pf *Flags) Register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&pf.XDS, "xds", "127.0.0.1:7182", "the spoke's xDS address")
	f.StringVar(&pf.Region, "region", "", "the proxy's region (default: its site's)")
	f.StringVar(&pf.Zone, "zone", "", "the proxy's zone (default: its site's)")
	f.StringVar(&pf.Address, "address", "", "the IP the workload's endpoints are registered at; inbound listeners bind there")
	f.StringArrayVar(&pf.inbound, "inbound", nil, "ENDPOINT_PORT=APP_HOST:PORT: terminate mTLS on the endpoint port and pass to the app (repeatable)")
	f.StringVar(&pf.Outbound, "outbound-prefix", "127.128.0.0/9", "address range of the outbound listeners, one address per service (- for none)")
}

// Inbound returns the --inbound flags: app address by endpoint port.
func (pf *Flags) Inbound() (map[uint32]string, error) {
	out := map[uint32]string{}
	for _, in := range pf.inbound {
		port, app, ok := strings.Cut(in, "=")
		n, err := strconv.ParseUint(port, 10, 16)
		if !ok || err != nil || n == 0 {
			return nil, fmt.Errorf("--inbound %q: want ENDPOINT_PORT=APP_HOST:PORT, for example 9080=127.0.0.1:8080", in)
		}
		if err := catalog.ValidateHostPort("--inbound app address", app); err != nil {
			return nil, err
		}
		out[uint32(n)] = app
	}
	if len(out) > 0 && pf.Address == "" {
		return nil, fmt.Errorf("--inbound needs --address: the IP the endpoints are registered at")
	}
	return out, nil
}

// New returns the proxy command; logger is the CLI's.
func New(logger func() *slog.Logger) *cobra.Command {
	var pf Flags
	o := proxy.DefaultOptions()
	var ido identityclient.Options
	var concurrency func() (int, error)
	var slice func(*slog.Logger) error
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run the built-in data plane: outbound listeners per service, inbound mTLS with authorization",
		Long: `The proxy attests to its site's spoke with a one-time node token, gets its
configuration over xDS and carries its workload's traffic with mTLS:

  outbound  one listener per federated service port, on an address from
            --outbound-prefix (see 'meshfed service list' for each service's);
            connections go to the closest healthy endpoints (zone, region,
            then other sites in failover order), failed connects are retried
            on the next endpoint and repeated failures eject an endpoint.
  inbound   --inbound 9080=127.0.0.1:8080 terminates mTLS on the registered
            endpoint port, checks the caller's SPIFFE ID against the service's
            policy, and passes the connection to the app.
  DNS       --dns-listen 127.0.0.1:15053 answers the service names,
            <name>.<namespace>.svc.clusterset.local, with their outbound
            listeners' address; an unknown service is NXDOMAIN, other names
            are forwarded to the resolvers of /etc/resolv.conf.`,
		Example: `  meshfed proxy --identity 10.0.0.2:7181 --xds 10.0.0.2:7182 --token "$NODE_TOKEN" \
    --workload spiffe://east.meshfed/ns/default/sa/echo --address 10.0.0.7 --inbound 9080=127.0.0.1:8080`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			// A sidecar's live heap is a few MB: collecting at half again
			// keeps the proxy within its 20 MB budget for little CPU.
			SetGCPercent(50)
			loops, err := concurrency()
			if err != nil {
				return err
			}
			if err := slice(logger()); err != nil {
				return err
			}
			in, err := pf.Inbound()
			if err != nil {
				return err
			}
			id, err := Attest(ctx, ido, logger())
			if err != nil {
				return err
			}
			o.XDS, o.Identity, o.Address, o.Inbound, o.OutboundPrefix = pf.XDS, id, pf.Address, in, pf.Outbound
			o.Locality = catalog.Locality{Region: pf.Region, Zone: pf.Zone}
			o.Logger, o.Loops = logger(), loops
			p, err := proxy.New(o)
			if err != nil {
				return err
			}
			return p.Run(ctx)
		},
	}
	pf.Register(cmd)
	IdentityFlags(cmd, &ido, &o.HTTPListen, &o.DrainTimeout)
	// A sidecar shares its pod's CPUs with the app: two, as Istio's
	// sidecars default to, unless Go sees fewer.
	concurrency = ConcurrencyFlag(cmd, 2, false)
	slice = SliceFlag(cmd, 0)
	cmd.Flags().StringVar(&ido.Workload, "workload", "", "run as this workload's SPIFFE ID (the host must run one of its endpoints); default: the node's ID")
	cmd.Flags().StringVar(&o.DNSListen, "dns-listen", "-", "serve <name>.<namespace>.svc.clusterset.local here (UDP and TCP), with each service's outbound address; other names go to the host's resolvers (- for no DNS)")
	return cmd
}

// SetGCPercent sets the garbage collector's target unless the user set
// GOGC.
func SetGCPercent(p int) {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(p)
	}
}

// ConcurrencyFlag registers --concurrency, the CPUs the process uses: its
// event loops (one thread each), and as many goroutine threads
// (GOMAXPROCS), but never fewer than 2, Go's own floor under a CPU limit:
// with a single P every wait of a loop hands the P to another thread and
// back, which doubled the proxies' CPU per request in bench/proxy. With
// spareP (the gateway, whose loops keep their P while they wait; see
// proxy's eventLoop.wait) GOMAXPROCS is one above the loops' count, so
// goroutines have a P of their own. The default def (0: as many as Go
// uses, the container's CPU limit or else the host's CPUs) never makes
// more loops than Go's own count, and GOMAXPROCS in the environment sets
// the loops' count unless the flag is given. The returned func applies it
// and returns the number of loops; call it before anything starts.
func ConcurrencyFlag(cmd *cobra.Command, def int, spareP bool) func() (int, error) {
	threads := "goroutine threads (GOMAXPROCS, 2 at least)"
	if spareP {
		threads = "one goroutine thread (GOMAXPROCS) more"
	}
	n := cmd.Flags().Int("concurrency", def, "CPUs to use: event loops, and "+threads+"; 0 for as many as the container's CPU limit or the host has")
	return func() (int, error) {
		given := cmd.Flags().Changed("concurrency")
		switch {
		case *n < 0:
			return 0, fmt.Errorf("--concurrency %d: want 0 (as many CPUs as there are) or more", *n)
		case *n == 0, !given && os.Getenv("GOMAXPROCS") != "":
			*n = runtime.GOMAXPROCS(0)
			if !spareP {
				return *n, nil
			}
		case !given:
			*n = min(*n, runtime.GOMAXPROCS(0))
		}
		if spareP {
			runtime.GOMAXPROCS(*n + 1)
		} else {
			runtime.GOMAXPROCS(max(*n, 2))
		}
		return *n, nil
	}
}

// SliceFlag registers --cpu-slice: the CPU time slice the process asks
// Linux for on each of its threads (package cpuslice). The returned func
// applies it, before anything starts, and logs what the kernel granted; a
// kernel that takes no slice leaves its own, which is no error.
func SliceFlag(cmd *cobra.Command, def time.Duration) func(*slog.Logger) error {
	d := cmd.Flags().Duration("cpu-slice", def, fmt.Sprintf("CPU time slice to ask Linux 6.12+ for, %v to %v: a short one lets traffic that wakes the process preempt CPU-bound work on its CPUs; 0 keeps the kernel's", cpuslice.Min, cpuslice.Max))
	return func(log *slog.Logger) error {
		switch {
		case *d < 0:
			return fmt.Errorf("--cpu-slice %v: want 0 (the kernel's) or %v to %v", *d, cpuslice.Min, cpuslice.Max)
		case *d == 0:
			return nil
		}
		granted, err := cpuslice.Set(*d)
		switch {
		case errors.Is(err, cpuslice.ErrUnsupported):
			log.Info("running with the kernel's CPU slice", "reason", err)
		case err != nil:
			log.Warn("could not set the CPU slice of some threads; they keep theirs", "err", err)
		default:
			log.Info("CPU slice set", "asked", *d, "granted", granted)
		}
		return nil
	}
}

// AttestFlags registers how a process attests to its spoke.
func AttestFlags(cmd *cobra.Command, ido *identityclient.Options) {
	f := cmd.Flags()
	f.StringVar(&ido.Addr, "identity", "127.0.0.1:7181", "the spoke's identity (SVID) API")
	f.StringVar(&ido.Token, "token", "", "one-time node `token` from 'meshfed vm token create' (or MESHFED_TOKEN, which ps does not show)")
	f.StringVar(&ido.KubernetesTokenFile, "kubernetes-token-file", "", "in a pod, instead of --token: a projected ServiceAccount token with audience meshfed")
	f.StringVar(&ido.CAFile, "ca-file", "", "with --kubernetes-token-file: the site's CA certificates (the spoke's ConfigMap meshfed-system/meshfed-site-bundle)")
}

// IdentityFlags registers what the proxy and the gateway share: how they
// attest, and their HTTP and drain settings (defaults: what httpListen and
// drain hold).
func IdentityFlags(cmd *cobra.Command, ido *identityclient.Options, httpListen *string, drain *time.Duration) {
	AttestFlags(cmd, ido)
	f := cmd.Flags()
	f.StringVar(httpListen, "http-listen", *httpListen, "address for /healthz, /readyz and /metrics (- disables)")
	f.DurationVar(drain, "drain-timeout", *drain, "how long live connections may finish after SIGTERM")
}

// Attest gets the process's SVID from its spoke with a node token or a
// ServiceAccount token.
func Attest(ctx context.Context, ido identityclient.Options, log *slog.Logger) (*identityclient.Client, error) {
	if ido.Token == "" {
		ido.Token = os.Getenv("MESHFED_TOKEN")
	}
	if ido.Token == "" && ido.KubernetesTokenFile == "" {
		return nil, fmt.Errorf("--token (or MESHFED_TOKEN) is required: create one with `meshfed vm token create --site SITE --node NODE`; in a pod, pass --kubernetes-token-file and --ca-file instead")
	}
	if ido.KubernetesTokenFile != "" && ido.CAFile == "" {
		return nil, fmt.Errorf("--kubernetes-token-file needs --ca-file: the site's CA certificates, which the spoke publishes in ConfigMap meshfed-system/meshfed-site-bundle")
	}
	ido.Logger = log
	return identityclient.New(ctx, ido)
}
