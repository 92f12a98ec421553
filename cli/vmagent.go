package cli

import (
	"os"

	"github.com/meshfed/meshfed/vmagent"
	"github.com/spf13/cobra"
)

// newVMAgentCmd returns the host agent's command.
func newVMAgentCmd(g *globals) *cobra.Command {
	o := vmagent.DefaultOptions()
	cmd := &cobra.Command{
		Use:   "vmagent --spoke HOST:PORT --data-dir DIR",
		Short: "Run a Docker/VM host's agent: attest the host, discover its labelled containers, report them to the site's spoke",
		Long: `The agent redeems a one-time node token (meshfed vm token create) at its
site's spoke once and keeps the node SVID it gets in --data-dir (0600), so a
restart needs no new token. It lists the host's containers and follows the
Docker events stream: every running container labelled meshfed.io/service
becomes an endpoint of that service (meshfed.io/port, meshfed.io/namespace,
meshfed.io/version, meshfed.io/health, meshfed.io/network,
meshfed.io/label.<k>). It reports the host's whole state to the spoke on
every change and every few seconds, so nothing is duplicated or left behind.`,
		Example: `  # first start, as root on the host
  MESHFED_TOKEN=mf1.… meshfed vmagent --spoke dc1-spoke:7181 --data-dir /var/lib/meshfed-vmagent
  # a container it picks up
  docker run -d -l meshfed.io/service=echo -l meshfed.io/port=8080 -l meshfed.io/version=v2 my/echo`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.Token == "" {
				o.Token = os.Getenv("MESHFED_TOKEN")
			}
			o.Logger, o.Version = g.logger(), Version
			a, err := vmagent.New(cmd.Context(), o)
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Spoke, "spoke", "", "the site spoke's identity endpoint host:port (required)")
	f.StringVar(&o.Token, "token", "", "one-time node `token`, first start only (or MESHFED_TOKEN, which ps does not show)")
	f.StringVar(&o.DataDir, "data-dir", "", "directory for the node's SVID (required)")
	f.StringVar(&o.DockerHost, "docker-host", "", "Docker Engine address (default DOCKER_HOST or the local socket; - for none)")
	f.StringVar(&o.Network, "network", "", "Docker network whose container address is the endpoint's, for containers on several networks")
	f.StringVar(&o.StaticServices, "static-services", "", "services file (the spoke's format) for processes that are not containers")
	f.DurationVar(&o.CheckInterval, "check-interval", o.CheckInterval, "how often containers without a HEALTHCHECK are checked")
	f.StringVar(&o.HTTPListen, "http-listen", o.HTTPListen, "serve /healthz, /readyz and /metrics here (- disables)")
	_ = cmd.MarkFlagRequired("spoke")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}
