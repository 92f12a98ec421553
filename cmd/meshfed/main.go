// Command meshfed is the one binary of meshfed: hub, spoke and CLI.
package main

import (
	"os"

	"github.com/meshfed/meshfed/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:])) }
