package cli

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/hub"
	"github.com/meshfed/meshfed/spoke"
	"github.com/meshfed/meshfed/spoke/file"
	"github.com/meshfed/meshfed/spoke/kube"
	"github.com/meshfed/meshfed/spoke/kube/mcsexport"
	"github.com/meshfed/meshfed/spoke/kube/mcsimport"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/trust/siteca"
	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

func newHubCmd(g *globals) *cobra.Command {
	o := hub.DefaultOptions()
	var storeKind, etcdPrefix string
	var etcdEndpoints []string
	cmd := &cobra.Command{
		Use:   "hub",
		Short: "Run the hub: site registry, federated catalog, join tokens and the federation CA",
		Example: `  meshfed hub --data-dir /var/lib/meshfed --listen :7443
  meshfed hub --data-dir /var/lib/meshfed --store etcd --etcd-endpoints http://10.0.0.5:2379`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			o.Logger = g.logger()
			switch storeKind {
			case "bolt":
			case "etcd":
				s, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: etcdEndpoints, Prefix: etcdPrefix})
				if err != nil {
					return err
				}
				o.Store = s
			default:
				return fmt.Errorf("--store %q is unknown: use bolt (a file in --data-dir) or etcd", storeKind)
			}
			h, err := hub.New(ctx, o)
			if err != nil {
				if o.Store != nil {
					o.Store.Close()
				}
				return err
			}
			return h.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.DataDir, "data-dir", "", "directory for the hub's state and admin.conf (required)")
	f.StringVar(&o.Listen, "listen", ":7443", "gRPC address for spokes and the CLI")
	f.StringVar(&o.HTTPListen, "http-listen", "127.0.0.1:7080", "address for /healthz, /readyz and /metrics (- disables)")
	f.StringVar(&o.Federation, "federation", "meshfed", "federation name, also its root SPIFFE trust domain")
	gossipFlags(f, &o.GossipListen, &o.GossipAdvertise, &o.GossipProbeInterval,
		"join the WAN gossip pool at this `address` (UDP and TCP), e.g. :7946, so 'meshfed site list' shows the pool's view (default off)",
		"the address pool members reach the hub's gossip at (default --gossip-listen)")
	f.StringVar(&o.BundleListen, "bundle-listen", "", "serve the SPIFFE bundle endpoint (https_spiffe) of every federated trust domain here, e.g. :7444 (default off)")
	f.StringVar(&o.Advertise, "advertise", "", "host:port spokes and the CLI reach the hub at (default: the listen address)")
	f.DurationVar(&o.SpokeCertTTL, "spoke-cert-ttl", 30*24*time.Hour, "lifetime of spoke certificates; spokes renew at half-life")
	f.StringVar(&storeKind, "store", "bolt", "state store: bolt (a file in --data-dir) or etcd (for several hub replicas)")
	f.StringSliceVar(&etcdEndpoints, "etcd-endpoints", nil, "etcd client URLs, with --store etcd")
	f.StringVar(&etcdPrefix, "etcd-prefix", "/meshfed/", "key prefix in etcd, with --store etcd")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}

func newSpokeCmd(g *globals) *cobra.Command {
	o := spoke.DefaultOptions()
	var services, kubeconfig, kubeContext, caSecret, credSecret, bundleConfigMap string
	var poll time.Duration
	var cf consulFlags
	var tokenFile string
	cmd := &cobra.Command{
		Use:   "spoke",
		Short: "Run a site's spoke: publish its services to the hub and keep the federated view",
		Example: `  # first start: join with a one-time token
  meshfed spoke --site east --hub hub.example.com:7443 --token mf1.… --services services.yaml --data-dir /var/lib/meshfed-spoke
  # later starts need no token: the data dir keeps the credential
  meshfed spoke --site east --services services.yaml --data-dir /var/lib/meshfed-spoke`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			o.Logger = g.logger()
			// In a cluster the join secret arrives through the environment.
			if o.Hub == "" {
				o.Hub = os.Getenv("MESHFED_HUB")
			}
			if o.Token == "" && tokenFile != "" {
				tok, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("--token-file: %w", err)
				}
				o.Token = strings.TrimSpace(string(tok))
			}
			if o.Token == "" {
				o.Token = os.Getenv("MESHFED_TOKEN")
			}
			// sp is set before the source first runs (in sp.Run).
			var sp *spoke.Spoke
			var err error
			if services != "" {
				src := file.New(file.Options{
					Path: services, Interval: poll, Logger: o.Logger.With("component", "file"),
					OnError: func(err error) { sp.OnSourceError(err) },
				})
				if _, err := src.Load(); err != nil {
					return fmt.Errorf("--services %s: %w", services, err)
				}
				o.Source = src
			}
			if cf.addr != "" {
				if services != "" {
					return fmt.Errorf("--services and --consul-addr are two sources: give one (a site's catalog comes from one place)")
				}
				from, to, err := cf.directions()
				if err != nil {
					return err
				}
				if err := cf.dial(); err != nil {
					return err
				}
				if from {
					if o.Source, err = cf.source(o.Logger, o.Registry, func(err error) { sp.OnSourceError(err) }); err != nil {
						return err
					}
				}
				if to {
					if o.Importer, err = cf.registrar(o.Logger, o.Registry, func() catalog.SiteView { return sp.Snapshot() }); err != nil {
						return err
					}
				}
			}
			inCluster := os.Getenv("KUBERNETES_SERVICE_HOST") != ""
			// kc: the site's cluster, when the spoke has one.
			var kc kubernetes.Interface
			if kubeconfig != "" || inCluster {
				rc, err := kube.RESTConfig(kubeconfig, kubeContext)
				if err != nil {
					return err
				}
				if kc, err = kubernetes.NewForConfig(rc); err != nil {
					return err
				}
				o.Attestor = kube.Attestor{Client: kc}
				mcs, err := mcsclient.NewForConfig(rc)
				if err != nil {
					return err
				}
				if o.Source == nil {
					// No services file: the cluster's exported services.
					o.Source = mcsexport.New(mcsexport.Options{Client: kc, MCS: mcs, Logger: o.Logger.With("component", "mcsexport")})
					o.Importer = mcsimport.New(mcsimport.Options{Client: kc, MCS: mcs, Logger: o.Logger.With("component", "mcsimport")})
				}
			}
			if o.Credentials, err = secretStorage(kc, "credential-secret", credSecret, inCluster, "meshfed-system/meshfed-spoke-credential"); err != nil {
				return err
			}
			if o.CA.Storage, err = secretStorage(kc, "ca-secret", caSecret, inCluster, "meshfed-system/meshfed-site-ca"); err != nil {
				return err
			}
			if bundleConfigMap == "" && inCluster {
				bundleConfigMap = "meshfed-system/meshfed-site-bundle"
			}
			if bundleConfigMap != "" {
				if kc == nil {
					return fmt.Errorf("--ca-configmap needs a cluster: pass --kubeconfig or run the spoke in the cluster")
				}
				ns, name, err := kube.ParseSecretRef(bundleConfigMap)
				if err != nil {
					return fmt.Errorf("--ca-configmap %q: want namespace/name", bundleConfigMap)
				}
				o.Bundles = kube.BundleConfigMap{Client: kc, Namespace: ns, Name: name}
			}
			sp, err = spoke.New(ctx, o)
			if err != nil {
				return err
			}
			return sp.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Site, "site", "", "this site's name (required)")
	f.StringVar(&o.Hub, "hub", "", "hub address host:port (needed to join)")
	f.StringVar(&o.Token, "token", "", "one-time join `token` from 'meshfed site token create', first start only (or MESHFED_TOKEN, which ps does not show)")
	f.StringVar(&tokenFile, "token-file", "", "file holding the one-time join token, instead of --token")
	f.StringVar(&o.DataDir, "data-dir", "", "directory for the spoke's credential and federated view (required)")
	f.StringVar(&services, "services", "", "YAML file listing this site's services (watched for changes)")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the site's cluster, when the spoke runs outside it (inside, the in-cluster config is used)")
	f.StringVar(&kubeContext, "context", "", "kubeconfig context")
	f.StringVar(&credSecret, "credential-secret", "", "keep the spoke's hub credential in this Kubernetes Secret, namespace/name (default in a cluster: meshfed-system/meshfed-spoke-credential; outside: spoke.conf under --data-dir)")
	f.StringVar(&bundleConfigMap, "ca-configmap", "", "publish the site's CA certificates in this ConfigMap, namespace/name, for pods that attest with ServiceAccount tokens (default in a cluster: meshfed-system/meshfed-site-bundle)")
	f.StringVar(&caSecret, "ca-secret", "", "keep the site CA in this Kubernetes Secret, namespace/name (default in a cluster: meshfed-system/meshfed-site-ca; outside: files under --data-dir)")
	f.DurationVar(&poll, "services-poll", time.Second, "how often to check the services file for changes")
	f.StringVar(&o.HTTPListen, "http-listen", "127.0.0.1:7180", "address for /healthz, /readyz, /metrics and /v1/catalog (- disables)")
	f.StringVar(&o.IdentityListen, "identity-listen", "127.0.0.1:7181", "address of the SVID API for the site's hosts and workloads (- disables)")
	gossipFlags(f, &o.GossipListen, &o.GossipAdvertise, &o.GossipProbeInterval,
		"join the WAN gossip pool here (UDP and TCP), e.g. :7946; other sites' gateway failures then reach this site's EDS within about a second, hub or not (default off)",
		"where pool members reach this spoke (default --gossip-listen)")
	f.StringVar(&o.XDSListen, "xds-listen", "127.0.0.1:7182", "address of the xDS server (ADS) for the site's proxies, Envoys and proxyless gRPC clients (- disables)")
	f.StringVar(&o.CA.KeyType, "ca-key-type", "ec-p256", "key type of the site CA when it is first created: ec-p256, ec-p384 or rsa-2048")
	f.DurationVar(&o.CA.CATTL, "ca-ttl", 365*24*time.Hour, "lifetime of the site CA when it is first created")
	f.DurationVar(&o.CA.SVIDTTL, "svid-ttl", time.Hour, "lifetime of SVIDs the site CA issues (at most)")
	f.DurationVar(&o.CA.ActivationDelay, "ca-activation-delay", 5*time.Minute, "on CA rotation, how long the new CA is only published before it signs")
	f.DurationVar(&o.MaxStale, "max-stale", 24*time.Hour, "keep serving other sites' services this long after the hub was last reached (negative: forever)")
	f.DurationVar(&o.HostStaleAfter, "host-stale-after", o.HostStaleAfter, "mark a host agent's endpoints unhealthy once it has not reported for this long")
	f.DurationVar(&o.HostExpireAfter, "host-expire-after", o.HostExpireAfter, "remove a host agent's endpoints from the catalog once it has not reported for this long")
	cf.register(f)
	_ = cmd.MarkFlagRequired("site")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}

// secretStorage is the Secret named by --flag (ref, or def in a cluster),
// or nil when there is none: the spoke then uses files in its data dir.
func secretStorage(kc kubernetes.Interface, flag, ref string, inCluster bool, def string) (siteca.Storage, error) {
	if ref == "" && inCluster {
		ref = def
	}
	if ref == "" {
		return nil, nil
	}
	if kc == nil {
		return nil, fmt.Errorf("--%s needs a cluster: pass --kubeconfig or run the spoke in the cluster", flag)
	}
	ns, name, err := kube.ParseSecretRef(ref)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", flag, err)
	}
	return kube.SecretStorage{Client: kc, Namespace: ns, Name: name}, nil
}
