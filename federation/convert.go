package federation

import (
	"crypto/x509"
	"fmt"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var healthToWire = map[string]meshfedv1.Health{
	"":                      meshfedv1.Health_HEALTH_HEALTHY,
	catalog.HealthHealthy:   meshfedv1.Health_HEALTH_HEALTHY,
	catalog.HealthUnhealthy: meshfedv1.Health_HEALTH_UNHEALTHY,
	catalog.HealthDraining:  meshfedv1.Health_HEALTH_DRAINING,
	catalog.HealthUnknown:   meshfedv1.Health_HEALTH_UNKNOWN,
}

var healthFromWire = map[meshfedv1.Health]string{
	meshfedv1.Health_HEALTH_HEALTHY:   catalog.HealthHealthy,
	meshfedv1.Health_HEALTH_UNHEALTHY: catalog.HealthUnhealthy,
	meshfedv1.Health_HEALTH_DRAINING:  catalog.HealthDraining,
	meshfedv1.Health_HEALTH_UNKNOWN:   catalog.HealthUnknown,
}

var stateFromWire = map[meshfedv1.SiteState]string{
	meshfedv1.SiteState_SITE_STATE_PENDING:   catalog.StatePending,
	meshfedv1.SiteState_SITE_STATE_CONNECTED: catalog.StateConnected,
	meshfedv1.SiteState_SITE_STATE_STALE:     catalog.StateStale,
}

// ServiceToWire converts a service of site to its wire form. Endpoint
// weights default to 1 and health to healthy, so the version of a service
// does not depend on how its source spelled the defaults.
func ServiceToWire(site string, s catalog.Service) *meshfedv1.Service {
	out := &meshfedv1.Service{Site: site, Namespace: s.Namespace, Name: s.Name}
	for _, p := range s.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = "TCP"
		}
		out.Ports = append(out.Ports, &meshfedv1.Port{Name: p.Name, Port: p.Port, Protocol: proto})
	}
	out.Endpoints = make([]*meshfedv1.Endpoint, 0, len(s.Endpoints))
	for _, e := range s.Endpoints {
		w := e.Weight
		if w == 0 {
			w = 1
		}
		ep := &meshfedv1.Endpoint{
			Address: e.Address, Port: e.Port, PortName: e.PortName,
			Health: healthToWire[e.Health], Weight: w, Labels: e.Labels, Identity: e.Identity,
		}
		if e.Region != "" || e.Zone != "" {
			ep.Locality = &meshfedv1.Locality{Region: e.Region, Zone: e.Zone}
		}
		out.Endpoints = append(out.Endpoints, ep)
	}
	return out
}

// ServiceFromWire converts a wire service to the catalog model. Endpoints
// without a locality of their own get def's (the site's).
func ServiceFromWire(s *meshfedv1.Service, def catalog.Locality) catalog.Service {
	out := catalog.Service{Site: s.GetSite(), Namespace: s.GetNamespace(), Name: s.GetName()}
	for _, p := range s.GetPorts() {
		out.Ports = append(out.Ports, catalog.Port{Name: p.GetName(), Port: p.GetPort(), Protocol: p.GetProtocol()})
	}
	out.Endpoints = make([]catalog.Endpoint, 0, len(s.GetEndpoints()))
	for _, e := range s.GetEndpoints() {
		ep := catalog.Endpoint{
			Site: s.GetSite(), Address: e.GetAddress(), Port: e.GetPort(), PortName: e.GetPortName(),
			Region: e.GetLocality().GetRegion(), Zone: e.GetLocality().GetZone(),
			Health: healthFromWire[e.GetHealth()], Weight: e.GetWeight(), Labels: e.GetLabels(), Identity: e.GetIdentity(),
		}
		if ep.Region == "" {
			ep.Region = def.Region
		}
		if ep.Zone == "" {
			ep.Zone = def.Zone
		}
		out.Endpoints = append(out.Endpoints, ep)
	}
	return out
}

// SiteToWire converts a site's registration to its wire form (without the
// hub's bookkeeping).
func SiteToWire(s catalog.Site) *meshfedv1.Site {
	return &meshfedv1.Site{
		Name: s.Name, Kind: s.Kind,
		Locality:         &meshfedv1.Locality{Region: s.Locality.Region, Zone: s.Locality.Zone},
		Network:          s.Network,
		TrustDomain:      s.TrustDomain,
		GatewayAddresses: s.GatewayAddresses,
	}
}

// SiteFromWire converts a wire site to the catalog model.
func SiteFromWire(s *meshfedv1.Site) catalog.Site {
	return catalog.Site{
		Name: s.GetName(), Kind: s.GetKind(),
		Locality:         catalog.Locality{Region: s.GetLocality().GetRegion(), Zone: s.GetLocality().GetZone()},
		Network:          s.GetNetwork(),
		TrustDomain:      s.GetTrustDomain(),
		GatewayAddresses: s.GetGatewayAddresses(),
		State:            stateFromWire[s.GetState()],
	}
}

// SiteStatusFromWire converts a site with the hub's bookkeeping.
func SiteStatusFromWire(s *meshfedv1.SiteStatus) catalog.Site {
	out := SiteFromWire(s.GetSite())
	out.Created = timeOf(s.GetCreated())
	out.LastSync = timeOf(s.GetLastSync())
	out.ConnectedSince = timeOf(s.GetConnectedSince())
	out.Services = int(s.GetServices())
	out.Endpoints = int(s.GetEndpoints())
	out.Gossip = s.GetGossip()
	if src := s.GetSource(); src != nil {
		out.Source = "ok"
		if !src.GetHealthy() {
			out.Source = src.GetMessage() + " (since " + timeOf(src.GetSince()).UTC().Format(time.RFC3339) + ")"
		}
	}
	return out
}

func timeOf(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

// BundleToWire converts a SPIFFE bundle; site is "" for an outside one.
func BundleToWire(site string, b *spiffebundle.Bundle) *meshfedv1.Bundle {
	out := &meshfedv1.Bundle{TrustDomain: b.TrustDomain().Name(), Site: site}
	for _, c := range b.X509Authorities() {
		out.X509Authorities = append(out.X509Authorities, c.Raw)
	}
	if seq, ok := b.SequenceNumber(); ok {
		out.Sequence = seq
	}
	if hint, ok := b.RefreshHint(); ok {
		out.RefreshHintSeconds = int64(hint / time.Second)
	}
	return out
}

// BundleFromWire parses a wire bundle; every authority must be a CA
// certificate.
func BundleFromWire(b *meshfedv1.Bundle) (*spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("bundle trust domain %q: %w", b.GetTrustDomain(), err)
	}
	if len(b.GetX509Authorities()) == 0 {
		return nil, fmt.Errorf("bundle of %s has no X.509 authorities", td)
	}
	out := spiffebundle.New(td)
	for i, der := range b.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("bundle of %s: authority %d: %w", td, i, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("bundle of %s: authority %d is not a CA certificate", td, i)
		}
		out.AddX509Authority(c)
	}
	out.SetSequenceNumber(b.GetSequence())
	if b.GetRefreshHintSeconds() > 0 {
		out.SetRefreshHint(time.Duration(b.GetRefreshHintSeconds()) * time.Second)
	}
	return out, nil
}
