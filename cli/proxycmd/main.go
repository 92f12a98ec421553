package proxycmd

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/meshfed/meshfed/shutdown"
	"github.com/spf13/cobra"
)

// Main runs the meshfed-proxy binary with args and returns the exit code:
// the proxy command alone, so the data plane links (and keeps in memory)
// none of the hub, spoke or Kubernetes code.
func Main(args []string) int { return MainOf("meshfed-proxy", New, args) }

// MainOf runs the binary name, which is one command (newCmd's), with args
// and returns the exit code.
func MainOf(name string, newCmd func(logger func() *slog.Logger) *cobra.Command, args []string) int {
	var level string
	cmd := newCmd(func() *slog.Logger {
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(level)); err != nil {
			lvl = slog.LevelInfo
		}
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	})
	cmd.Use = name
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	cmd.PersistentFlags().StringVar(&level, "log-level", "info", "log level: debug, info, warn or error")
	cmd.SetArgs(args)
	ctx, stop := shutdown.Context()
	defer stop()
	if err := cmd.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		return 1
	}
	return 0
}
