// Package e2e runs meshfed as a user does: the built binary as real hub and
// spoke processes on loopback, against a real etcd where the store is etcd.
package e2e
