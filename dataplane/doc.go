// Package dataplane is the engine below meshfed's two data-plane
// components, the workload proxy (proxy/) and the east-west gateway
// (gateway/), which import it and never each other. It holds no code of
// its own; its packages each hold one job:
//
//   - xdsclient: the ADS stream to the site's spoke, translated into a
//     Config (listeners, clusters, SVID, bundles);
//   - upstream: clusters' live state, Envoy's choice of endpoint, outlier
//     detection, and connecting with retries;
//   - loop: epoll event loops (Linux) that relay connections and batch
//     TLS records, and the routed listener the gateway runs on them;
//   - sni: the ClientHello parser the gateway routes by.
//
// SPIFFE TLS, which the proxy and every other component use, is in
// trust/mtls.
package dataplane
