// Package hub is meshfed's central control plane: the registry of sites,
// the federated catalog, the federation CA and one-time join tokens. It
// serves the Federation gRPC API to spokes and the Admin API to the CLI,
// both over mTLS, and keeps its state in a store.Store.
//
// The hub knows sites only through the API: it never talks to Kubernetes,
// Docker or Consul itself.
package hub
