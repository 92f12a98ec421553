//go:build tools

// Package tools pins the Consul agent the tests run (test/consul.sh builds
// it): v1.14.11, the last line under the Mozilla Public License 2.0.
package tools

import _ "github.com/hashicorp/consul"
