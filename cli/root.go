package cli

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshfed/meshfed/cli/vmagentcmd"
	"github.com/meshfed/meshfed/shutdown"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Version is set at build time with -ldflags "-X ...cli.Version=v1.2.3".
var Version = "dev"

type globals struct {
	config   string
	output   string
	logLevel string
	out      io.Writer
	errOut   io.Writer
}

// Main runs the CLI with args and returns the exit code.
func Main(args []string) int {
	g := &globals{out: os.Stdout, errOut: os.Stderr}
	root := newRoot(g)
	root.SetArgs(args)
	ctx, stop := shutdown.Context()
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(g.errOut, "error:", explain(err))
		return 1
	}
	return 0
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:           "meshfed",
		Short:         "Federate service catalogs and trust domains across Kubernetes, Docker and Consul sites",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.config, "config", defaultConfig(), "hub credential file (the admin.conf in the hub's data dir); env MESHFED_CONFIG")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table, json or yaml (pem too for trust bundles)")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level of long-running commands: debug, info, warn or error")
	root.AddCommand(newHubCmd(g), newSpokeCmd(g), newSiteCmd(g), newServiceCmd(g), newTrustCmd(g), newPolicyCmd(g), newGossipCmd(g), newDebugCmd(g), newProxyCmd(g), newGatewayCmd(g), newVMCmd(g), newConsulCmd(g), vmagentcmd.New(g.logger, Version), newSVIDCmd(g), newClusterCmd(g), newVersionCmd(g))
	return root
}

func defaultConfig() string {
	if v := os.Getenv("MESHFED_CONFIG"); v != "" {
		return v
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "admin.conf"
	}
	return filepath.Join(home, ".meshfed", "admin.conf")
}

func (g *globals) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(g.errOut, &slog.HandlerOptions{Level: lvl}))
}

// explain turns a gRPC error into the hub's own message, adding what to do
// when the hub cannot be reached.
func explain(err error) string {
	s, ok := status.FromError(err)
	if !ok {
		var se interface{ GRPCStatus() *status.Status }
		if errors.As(err, &se) {
			s, ok = se.GRPCStatus(), true
		}
	}
	if !ok {
		return err.Error()
	}
	msg := s.Message()
	switch s.Code() {
	case codes.Unavailable:
		return "cannot reach the hub: " + msg + " (is `meshfed hub` running, and does --config point at its admin.conf?)"
	case codes.DeadlineExceeded:
		return "the hub did not answer in time: " + msg
	}
	return strings.TrimSpace(msg)
}
