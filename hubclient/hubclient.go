// Package hubclient dials the hub's API: over mTLS with a credential file
// (trust/credential), or, before a spoke has a certificate, over TLS
// pinned to the hub's CA by a join token.
package hubclient

import (
	"context"
	"crypto/tls"
	"fmt"
	"time"

	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/meshfed/meshfed/trust/mtls"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// Dial connects to the hub with the credential.
func Dial(c *credential.File) (*grpc.ClientConn, error) {
	tc, err := c.TLS()
	if err != nil {
		return nil, err
	}
	return DialTLS(c.Hub, tc)
}

// DialPinned connects to the hub at addr without a client certificate,
// trusting the server only if its CA's key has the given pin and it is the
// hub of that CA's trust domain: the way a spoke first reaches the hub to
// redeem its join token.
func DialPinned(addr, pin string) (*grpc.ClientConn, error) {
	return DialTLS(addr, mtls.PinnedClientConfig(pin, mtls.AuthorizePath(ca.HubPath)))
}

// DialTLS connects to the hub at addr with tc.
func DialTLS(addr string, tc *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("dial hub %s: %w", addr, err)
	}
	return conn, nil
}

// Call bounds a CLI call's time.
func Call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 15*time.Second)
}
