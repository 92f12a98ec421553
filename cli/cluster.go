package cli

import (
	"context"

	"fmt"
	"io"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/deploy"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/kubeapply"
	"github.com/meshfed/meshfed/spoke/kube"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	sigsyaml "sigs.k8s.io/yaml"
)

func newClusterCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Register, list and remove Kubernetes clusters as sites"}
	cmd.AddCommand(newClusterRegisterCmd(g), newClusterRemoveCmd(g),
		newSiteListCmd(g, catalog.KindKubernetes, "List the Kubernetes sites with their state, last sync, counts and API health"))
	return cmd
}

type clusterFlags struct {
	kubeconfig, context, image string
}

// applier connects to the cluster of the flags.
func (f *clusterFlags) applier() (*kubeapply.Applier, *rest.Config, error) {
	rc, err := kube.RESTConfig(f.kubeconfig, f.context)
	if err != nil {
		return nil, nil, err
	}
	a, err := kubeapply.New(rc)
	return a, rc, err
}

func (f *clusterFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (required)")
	cmd.Flags().StringVar(&f.context, "context", "", "kubeconfig context (default: its current one)")
	_ = cmd.MarkFlagRequired("kubeconfig")
}

const joinPlaceholder = "<one-time join token, created when applied>"

// manifests are the objects register creates for site: the MCS CRDs when
// the cluster lacks them (marked as meshfed's), then the spoke's.
func manifests(ctx context.Context, a *kubeapply.Applier, p deploy.KubernetesParams) ([]*unstructured.Unstructured, error) {
	crds, err := kubeapply.Objects(deploy.MCSCRDs())
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, crd := range crds {
		cur, err := a.Get(ctx, crd)
		if err != nil {
			return nil, err
		}
		if cur == nil || cur.GetLabels()["app.kubernetes.io/managed-by"] == "meshfed" {
			crd.SetLabels(map[string]string{"app.kubernetes.io/managed-by": "meshfed"})
			out = append(out, crd)
		}
	}
	spoke, err := deploy.KubernetesSpoke(p)
	if err != nil {
		return nil, err
	}
	objs, err := kubeapply.Objects(spoke)
	if err != nil {
		return nil, err
	}
	return append(out, objs...), nil
}

func newClusterRegisterCmd(g *globals) *cobra.Command {
	var cf clusterFlags
	var site catalog.Site
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "register NAME",
		Short: "Register a Kubernetes cluster as a site and install its spoke and gateway",
		Long: `register uses your kubeconfig to create namespace meshfed-system, the spoke's
ServiceAccount with least-privilege RBAC (and an admission policy that keeps
its EndpointSlice writes to meshfed's own), the MCS CRDs if the cluster lacks
them, and the spoke and gateway Deployments with a one-time join token; it
records the site at the hub. Registering again changes nothing but the
token. --dry-run prints everything and creates nothing.`,
		Example: `  meshfed cluster register east --kubeconfig east.yaml --region us-east --zone us-east-1a
  meshfed cluster register east --kubeconfig east.yaml --region us-east --zone us-east-1a --dry-run -o yaml`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			site.Name, site.Kind = args[0], catalog.KindKubernetes
			if err := catalog.ValidateSite(site); err != nil {
				return err
			}
			a, _, err := cf.applier()
			if err != nil {
				return err
			}
			p := deploy.KubernetesParams{Site: site.Name, Image: cf.image, Token: joinPlaceholder}
			if dryRun {
				objs, err := manifests(ctx, a, p)
				if err != nil {
					return err
				}
				return g.printObjects(objs)
			}
			conf, err := credential.Load(g.config)
			if err != nil {
				return err
			}
			p.Hub = conf.Hub
			if p.Token, err = g.registerAtHub(cmd, site); err != nil {
				return err
			}
			objs, err := manifests(ctx, a, p)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.errOut, "registering cluster %s: applying %d objects\n", site.Name, len(objs))
			for i, o := range objs {
				if err := a.Apply(ctx, o); err != nil {
					return fmt.Errorf("%w (the site is recorded at the hub; fix the cause and run register again)", err)
				}
				fmt.Fprintf(g.errOut, "  [%d/%d] %s %s\n", i+1, len(objs), o.GetKind(), o.GetName())
			}
			fmt.Fprintf(g.errOut, "cluster %s registered: `meshfed cluster list` shows its spoke connect\n", site.Name)
			return nil
		},
	}
	cf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&site.Locality.Region, "region", "", "the cluster's region (required)")
	f.StringVar(&site.Locality.Zone, "zone", "", "the cluster's default zone (required)")
	f.StringVar(&site.Network, "network", "", "network name")
	f.StringVar(&site.TrustDomain, "trust-domain", "", "the site's SPIFFE trust domain (default <site>.<federation>)")
	f.StringSliceVar(&site.GatewayAddresses, "gateway-address", nil, "the east-west gateway's address HOST:PORT as other sites reach it (repeatable)")
	f.StringVar(&cf.image, "image", "meshfed:"+Version, "the meshfed image the spoke and gateway run")
	f.BoolVar(&dryRun, "dry-run", false, "print what would be applied (with -o yaml or json) and create nothing")
	_ = cmd.MarkFlagRequired("region")
	_ = cmd.MarkFlagRequired("zone")
	return cmd
}

// registerAtHub records site (again: an existing kubernetes site of that
// name is fine) and returns a fresh one-time join token.
func (g *globals) registerAtHub(cmd *cobra.Command, site catalog.Site) (string, error) {
	ctx, c, done, err := g.admin(cmd)
	if err != nil {
		return "", err
	}
	defer done()
	if _, err := c.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: federation.SiteToWire(site)}); status.Code(err) == codes.AlreadyExists {
		cur, err := c.GetSite(ctx, &meshfedv1.GetSiteRequest{Name: site.Name})
		if err != nil {
			return "", err
		}
		if cur.GetSite().GetKind() != catalog.KindKubernetes {
			return "", fmt.Errorf("site %s exists and is of kind %s, not a cluster: pick another name", site.Name, cur.GetSite().GetKind())
		}
	} else if err != nil {
		return "", err
	}
	tok, err := c.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: site.Name, Ttl: durationpb.New(time.Hour)})
	if err != nil {
		return "", err
	}
	return tok.GetToken(), nil
}

func (g *globals) printObjects(objs []*unstructured.Unstructured) error {
	switch g.output {
	case "json":
		items := make([]any, len(objs))
		for i, o := range objs {
			items[i] = o.Object
		}
		return g.render(map[string]any{"apiVersion": "v1", "kind": "List", "items": items}, nil)
	case "yaml", "table", "":
		for _, o := range objs {
			b, err := sigsyaml.Marshal(o.Object)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.out, "---\n%s", b)
		}
		return nil
	}
	return fmt.Errorf("-o %s: manifests print as yaml or json", g.output)
}

func newClusterRemoveCmd(g *globals) *cobra.Command {
	var cf clusterFlags
	cmd := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove what register installed, and every ServiceImport and EndpointSlice meshfed wrote; withdraw the site",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			a, rc, err := cf.applier()
			if err != nil {
				return err
			}
			dyn, err := dynamic.NewForConfig(rc)
			if err != nil {
				return err
			}
			// What the spoke wrote, in every namespace.
			sel := metav1.ListOptions{LabelSelector: "endpointslice.kubernetes.io/managed-by=meshfed"}
			for _, gvr := range []schema.GroupVersionResource{
				{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"},
				{Group: "multicluster.x-k8s.io", Version: "v1alpha1", Resource: "serviceimports"},
				{Group: "", Version: "v1", Resource: "services"}, // the imports' ClusterSetIPs
			} {
				l, err := dyn.Resource(gvr).List(ctx, sel)
				if err != nil && !strings.Contains(err.Error(), "the server could not find the requested resource") {
					return err
				}
				for i := range l.Items {
					if err := a.Delete(ctx, &l.Items[i]); err != nil {
						return err
					}
				}
			}
			objs, err := manifests(ctx, a, deploy.KubernetesParams{Site: args[0], Token: joinPlaceholder, Image: "-"})
			if err != nil {
				return err
			}
			for i := len(objs) - 1; i >= 0; i-- {
				if err := a.Delete(ctx, objs[i]); err != nil {
					return err
				}
			}
			fmt.Fprintf(g.errOut, "removed meshfed from the cluster (%d objects)\n", len(objs))
			hctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			if _, err := c.RemoveSite(hctx, &meshfedv1.RemoveSiteRequest{Name: args[0]}); err != nil && status.Code(err) != codes.NotFound {
				return err
			}
			return g.render(map[string]any{"cluster": args[0], "removed": true}, func(w io.Writer) {
				fmt.Fprintf(w, "cluster %s removed\n", args[0])
			})
		},
	}
	cf.add(cmd)
	return cmd
}
