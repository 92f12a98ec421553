// Package cli is the meshfed command line: it wires the components (hub,
// spoke) into commands and talks to the hub's Admin API for the kubectl-like
// commands. Nothing imports it but cmd/meshfed.
package cli
