// Package federation is meshfed's federation protocol, shared by the hub and
// the spokes: conversion between the catalog model and the wire messages,
// content-addressed resource versions, versioned tables with coalescing
// subscriptions, and the Session that runs one Sync stream.
//
// The protocol (docs/protocol.md) is symmetric. Each side opens with a Hello
// naming the versions it already holds of what the other side publishes; the
// other side then sends only what differs, as Deltas of at most MaxBatch
// resources, one in flight at a time, each answered by an Ack or a NACK.
// A slow receiver holds back only its own stream: changes queue as a set of
// dirty keys per subscriber, so superseded updates coalesce and memory is
// bounded by the number of keys, not the number of changes.
package federation
