//go:build !linux

package proxy

import "net"

// relay carries a's and b's bytes both ways until both are done, passing
// half-closes on, and then closes them.
func (p *Proxy) relay(a, b net.Conn) { pipe(a, b) }

// loopSet is empty: elsewhere than Linux nothing runs on event loops.
type loopSet struct{}

func (p *Proxy) stopRelayLoops() {}
