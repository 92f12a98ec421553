//go:build !linux

package vmagent

import (
	"errors"
	"net/netip"
)

var errNoRoutes = errors.New("the host proxy needs Linux (a local route for its outbound prefix): run with --host-proxy=false")

func addLocalRoute(netip.Prefix) (bool, error) { return false, errNoRoutes }
func delLocalRoute(netip.Prefix) error         { return errNoRoutes }
