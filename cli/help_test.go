package cli

import (
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// TestFlagHelpNamesItsValue: a back-quoted word in a flag's usage becomes
// the value's name in --help ("--token TOKEN"), so quoting a command there
// would print "--token meshfed vm token create".
func TestFlagHelpNamesItsValue(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.LocalFlags().VisitAll(func(f *pflag.Flag) {
			if name, _ := pflag.UnquoteUsage(f); strings.ContainsAny(name, " '") {
				t.Errorf("%s --%s shows its value as %q in --help; back-quote one word that names the value", c.CommandPath(), f.Name, name)
			}
		})
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRoot(&globals{out: io.Discard, errOut: io.Discard}))
}
