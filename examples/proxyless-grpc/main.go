// Command proxyless-grpc is a gRPC app that uses meshfed without a proxy:
// its client resolves xds:///<service> at the site's spoke and calls with
// mTLS (gRPC's xDS credentials), to its own site's endpoints and through
// other sites' gateways. Its server is a plain gRPC server behind a meshfed
// proxy's inbound listener or, with --xds, an xDS-enabled server that
// terminates mTLS and admits callers as the spoke says. `make demo` runs
// all three; see docs/dataplane.md ("Proxyless gRPC") for the setup.
//
//	proxyless-grpc serve --listen 127.0.0.1:19091 --name east
//	GRPC_XDS_BOOTSTRAP=server-bootstrap.json proxyless-grpc serve --xds --listen 10.0.0.7:19090 --name west
//	GRPC_XDS_BOOTSTRAP=bootstrap.json GRPC_EXPERIMENTAL_XDS_SNI=true \
//	  GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true proxyless-grpc call xds:///greeter.default:9090 --count 20
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/xds" // the xds:/// resolver and balancers, xDS servers
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// method is the one call the app knows: it answers with the server's name.
const method = "/meshfed.example.Greeter/Name"

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "call":
		err = call(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: proxyless-grpc serve --listen ADDR --name NAME | call TARGET [--count N]")
	os.Exit(2)
}

// serve answers every call with --name until SIGINT or SIGTERM.
func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:19091", "address to serve on: a meshfed proxy's inbound app address, or with --xds the endpoint itself")
	name := fs.String("name", "", "what to answer with")
	useXDS := fs.Bool("xds", false, "serve without a proxy: mTLS and allowed callers from the spoke (GRPC_XDS_BOOTSTRAP)")
	_ = fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	handler := grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
		if m, _ := grpc.MethodFromServerStream(stream); m != method {
			return fmt.Errorf("unknown method %s", m)
		}
		var in wrapperspb.StringValue
		if err := stream.RecvMsg(&in); err != nil {
			return err
		}
		return stream.SendMsg(wrapperspb.String(*name))
	})
	var s interface {
		Serve(net.Listener) error
		GracefulStop()
	}
	if *useXDS {
		if os.Getenv("GRPC_XDS_BOOTSTRAP") == "" {
			return fmt.Errorf("--xds needs GRPC_XDS_BOOTSTRAP: the file `meshfed proxy bootstrap --grpc --id <workload>` printed")
		}
		creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
		if err != nil {
			return err
		}
		if s, err = xds.NewGRPCServer(grpc.Creds(creds), handler); err != nil {
			return err
		}
	} else {
		s = grpc.NewServer(handler)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() { <-ctx.Done(); s.GracefulStop() }()
	return s.Serve(ln)
}

// call makes --count calls to target, each with a deadline, and prints who
// answered how often.
func call(args []string) error {
	if len(args) < 1 {
		usage()
	}
	target := args[0]
	fs := flag.NewFlagSet("call", flag.ExitOnError)
	count := fs.Int("count", 20, "how many calls")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of each call")
	_ = fs.Parse(args[1:])
	if os.Getenv("GRPC_XDS_BOOTSTRAP") == "" {
		return fmt.Errorf("GRPC_XDS_BOOTSTRAP is not set: point it at the file `meshfed proxy bootstrap --grpc` printed")
	}
	// mTLS as the spoke's clusters say; plain text only where they say
	// nothing.
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	answers := map[string]int{}
	var lastErr error
	for i := 0; i < *count; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		out := &wrapperspb.StringValue{}
		if err := conn.Invoke(ctx, method, wrapperspb.String("?"), out); err != nil {
			answers["(failed)"]++
			lastErr = err
		} else {
			answers[out.GetValue()]++
		}
		cancel()
	}
	names := make([]string, 0, len(answers))
	for n := range answers {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Printf("%-13s %s\n", "ANSWERED BY", "CALLS")
	for _, n := range names {
		fmt.Printf("%-13s %d\n", n, answers[n])
	}
	if lastErr != nil {
		return fmt.Errorf("%d of %d calls failed, the last with: %w", answers["(failed)"], *count, lastErr)
	}
	return nil
}
