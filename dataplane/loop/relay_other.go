//go:build !linux

package loop

import "net"

// Relay carries a's and b's bytes both ways until both are done, passing
// half-closes on, and then closes them: elsewhere than Linux, on two
// goroutines (the caller's listener tracks the connection).
func (r *Relayer) Relay(a, b net.Conn) { pipe(a, b) }

// Relayer relays on goroutines elsewhere than Linux.
type Relayer struct{ o RelayOptions }

// Stop does nothing: no loop runs.
func (r *Relayer) Stop() {}
