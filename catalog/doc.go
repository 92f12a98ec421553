// Package catalog is meshfed's shared model of a federation: sites, services,
// endpoints and localities, with the validation every component applies to
// them and the YAML services file that non-Kubernetes sites start from.
//
// It imports nothing else of meshfed's, so the hub, spokes, the CLI and the
// data plane can all agree on one model without importing each other.
package catalog
