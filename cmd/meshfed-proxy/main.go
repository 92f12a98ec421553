// Command meshfed-proxy is the data plane alone: `meshfed proxy` in a
// binary that links nothing else, for hosts and sidecars where memory
// counts.
package main

import (
	"os"

	"github.com/meshfed/meshfed/cli/proxycmd"
)

func main() { os.Exit(proxycmd.Main(os.Args[1:])) }
