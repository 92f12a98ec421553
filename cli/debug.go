package cli

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// The debug commands are a workload and a caller for trying the data plane
// and for drills: an app that says who it is, and a client that counts who
// answered.
func newDebugCmd(g *globals) *cobra.Command {
	var listen, name string
	echo := &cobra.Command{
		Use:   "echo --listen ADDR --name NAME",
		Short: "Run a TCP app that greets each connection with NAME, then echoes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return err
			}
			go func() { <-cmd.Context().Done(); ln.Close() }()
			for {
				c, err := ln.Accept()
				if err != nil {
					return nil
				}
				go func() {
					defer c.Close()
					fmt.Fprintln(c, name)
					_, _ = io.Copy(c, c)
				}()
			}
		},
	}
	echo.Flags().StringVar(&listen, "listen", "127.0.0.1:8080", "address to listen on")
	echo.Flags().StringVar(&name, "name", "echo", "the greeting: who answered")
	var count int
	var timeout time.Duration
	call := &cobra.Command{
		Use:   "call ADDR",
		Short: "Connect COUNT times to ADDR (a proxy's listener) and count who answered",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			got := map[string]int{}
			for i := 0; i < count; i++ {
				who, err := greet(args[0], timeout)
				if err != nil {
					who = "failed: " + err.Error()
				}
				got[who]++
			}
			var names []string
			for n := range got {
				names = append(names, n)
			}
			sort.Strings(names)
			return g.render(got, func(w io.Writer) {
				row(w, "ANSWERED BY", "CALLS")
				for _, n := range names {
					row(w, n, got[n])
				}
			})
		},
	}
	call.Flags().IntVar(&count, "count", 20, "connections to make")
	call.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "per connection")
	cmd := &cobra.Command{Use: "debug", Short: "A test app and caller for trying the data plane and for drills"}
	cmd.AddCommand(echo, call)
	return cmd
}

func greet(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no answer (%v)", err)
	}
	return strings.TrimSpace(line), nil
}
