// Command meshfed-vmagent is the host agent alone: `meshfed vmagent` in a
// binary that links nothing else, so a Docker host's memory stays its
// containers'.
package main

import (
	"os"

	"github.com/meshfed/meshfed/cli/vmagentcmd"
)

func main() { os.Exit(vmagentcmd.Main(os.Args[1:])) }
