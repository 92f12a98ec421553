// Package spoke is a site's local control plane. It keeps the site's own
// services (from a Source: a services file now, Kubernetes, vmagents or
// Consul later) in a local table and streams them to the hub, and it keeps
// the federated view the hub sends back on disk, so it goes on serving that
// view while the hub is unreachable, up to a staleness limit.
//
// The spoke talks to the hub only over the federation protocol; it never
// imports the hub.
package spoke
