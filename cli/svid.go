package cli

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/meshfed/meshfed/cli/proxycmd"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
)

// newSVIDCmd returns `svid`: an SVID and the federation's bundles kept as
// files, for Envoy and proxyless gRPC, which read their credentials from
// disk.
func newSVIDCmd(g *globals) *cobra.Command {
	var ido identityclient.Options
	var dir, httpListen string
	var once bool
	cmd := &cobra.Command{
		Use:   "svid --dir DIR",
		Short: "Keep an SVID and the federation's bundles as files, for Envoy and proxyless gRPC",
		Long: `Attests to the site's spoke with a one-time node token (or a ServiceAccount
token), then keeps these files in --dir, all replaced at once (each is a
symlink through --dir/..data, switched with one rename, as the kubelet
updates a projected volume) and readable by the owner only:

  ` + identityclient.FileSVID + `        the SVID's certificate chain
  ` + identityclient.FileKey + `    its private key
  ` + identityclient.FileBundle + `      the site's CA certificates (what the spoke's certificate chains to)
  ` + identityclient.FileFederation + `  every federated trust domain's CA certificates
  ` + identityclient.FileFederationMap + ` the same as a SPIFFE bundle map (gRPC's file_watcher reads it)

The SVID is renewed at half its lifetime and the files rewritten, bundles
included, until the command is stopped; --once writes them and exits (the
SVID then expires unrenewed). Point 'meshfed proxy bootstrap --grpc' or
'--envoy' at the same directory.`,
		Example: `  meshfed svid --identity 10.0.0.2:7181 --token "$NODE_TOKEN" --dir /etc/meshfed`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			log := g.logger()
			var c *identityclient.Client
			var onDisk atomic.Int64 // when the SVID in the files expires (Unix)
			writes := prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "meshfed_svid_file_writes_total", Help: "Writes of the SVID files, by result.",
			}, []string{"result"})
			write := func() error {
				err := c.WriteFiles(dir)
				if err != nil {
					writes.WithLabelValues("error").Inc()
					return fmt.Errorf("write the SVID files to %s: %w", dir, err)
				}
				writes.WithLabelValues("ok").Inc()
				onDisk.Store(c.SVID().Certificates[0].NotAfter.Unix())
				log.Info("wrote the SVID files", "dir", dir, "id", c.SVID().ID, "expires", c.SVID().Certificates[0].NotAfter)
				return nil
			}
			ido.Renewed = func() {
				if err := write(); err != nil {
					log.Error("keeping the previous files", "err", err)
				}
			}
			var err error
			if c, err = proxycmd.Attest(ctx, ido, log); err != nil {
				return err
			}
			if err := write(); err != nil {
				return err
			}
			if once {
				return nil
			}
			eg, ctx := errgroup.WithContext(ctx)
			if httpListen != "-" {
				reg := telemetry.NewRegistry()
				reg.MustRegister(writes, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
					Name: "meshfed_svid_expiry_timestamp_seconds", Help: "When the SVID in the files expires (Unix seconds).",
				}, func() float64 { return float64(onDisk.Load()) }))
				tele, err := telemetry.Listen(telemetry.Options{Listen: httpListen, Registry: reg, Logger: log, Ready: func() error {
					if exp := time.Unix(onDisk.Load(), 0); time.Now().After(exp) {
						return fmt.Errorf("the SVID in %s expired at %s: it could not be renewed or written", dir, exp.Format(time.RFC3339))
					}
					return nil
				}})
				if err != nil {
					return err
				}
				eg.Go(func() error { return tele.Run(ctx) })
			}
			eg.Go(func() error { return c.Run(ctx) })
			return eg.Wait()
		},
	}
	proxycmd.AttestFlags(cmd, &ido)
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "/etc/meshfed", "where the files go (created 0700 if missing)")
	f.StringVar(&ido.Workload, "workload", "", "hold this workload's SPIFFE ID (the host must run one of its endpoints); default: the node's ID")
	f.BoolVar(&once, "once", false, "write the files once and exit, without renewing")
	f.StringVar(&httpListen, "http-listen", "127.0.0.1:15092", "address for /healthz, /readyz and /metrics (- disables)")
	cmd.PreRunE = func(*cobra.Command, []string) error {
		if dir == "" {
			return errors.New("--dir is required: the directory the files go to")
		}
		var err error
		dir, err = filepath.Abs(dir)
		return err
	}
	return cmd
}
