package catalog

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ValidateName checks that v is a DNS-1123 label, as Kubernetes requires of
// namespaces and service names and as meshfed requires of site names: at
// most 63 characters of lowercase letters, digits and '-', starting and
// ending with a letter or digit. what names the field in the error.
func ValidateName(what, v string) error {
	if v == "" {
		return fmt.Errorf("%s is empty: want a DNS-1123 label such as \"east\"", what)
	}
	if len(v) > 63 {
		return fmt.Errorf("%s %q is %d characters long: a DNS-1123 label has at most 63", what, v, len(v))
	}
	for i, c := range v {
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(v)-1
		if !ok {
			return fmt.Errorf("%s %q is not a DNS-1123 label: use lowercase letters, digits and '-', starting and ending with a letter or digit", what, v)
		}
	}
	return nil
}

// ValidateKind checks a site kind.
func ValidateKind(kind string) error {
	switch kind {
	case KindKubernetes, KindDocker, KindConsul:
		return nil
	}
	return fmt.Errorf("site kind %q is unknown: want %s, %s or %s", kind, KindKubernetes, KindDocker, KindConsul)
}

// ValidateHealth checks an endpoint health value; empty means healthy.
func ValidateHealth(h string) error {
	switch h {
	case "", HealthHealthy, HealthUnhealthy, HealthDraining, HealthUnknown:
		return nil
	}
	return fmt.Errorf("health %q is unknown: want healthy, unhealthy, draining or unknown", h)
}

// ValidateHostPort checks host:port, where host is an IP or a DNS name.
func ValidateHostPort(what, hp string) error {
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		return fmt.Errorf("%s %q: want host:port, for example 203.0.113.7:15443: %w", what, hp, err)
	}
	if err := ValidateHost(what, host); err != nil {
		return err
	}
	if _, err := parsePort(port); err != nil {
		return fmt.Errorf("%s %q: %w", what, hp, err)
	}
	return nil
}

// ValidateHost checks an IP address or a DNS name.
func ValidateHost(what, host string) error {
	if net.ParseIP(host) != nil {
		return nil
	}
	if host == "" || len(host) > 253 {
		return fmt.Errorf("%s host %q is neither an IP address nor a DNS name", what, host)
	}
	for _, label := range strings.Split(strings.TrimSuffix(host, "."), ".") {
		if ValidateName("", label) != nil && !isUpperLabel(label) {
			return fmt.Errorf("%s host %q is neither an IP address nor a DNS name", what, host)
		}
	}
	return nil
}

func isUpperLabel(l string) bool {
	return ValidateName("", strings.ToLower(l)) == nil
}

func parsePort(s string) (uint32, error) {
	var p uint32
	if s == "" {
		return 0, errors.New("port is empty")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a number", s)
		}
		p = p*10 + uint32(c-'0')
		if p > 65535 {
			return 0, fmt.Errorf("port %s is out of range 1-65535", s)
		}
	}
	if p == 0 {
		return 0, errors.New("port 0 is out of range 1-65535")
	}
	return p, nil
}

// ValidateSite checks a site as it is registered.
func ValidateSite(s Site) error {
	if err := ValidateName("site name", s.Name); err != nil {
		return err
	}
	if err := ValidateKind(s.Kind); err != nil {
		return err
	}
	if s.TrustDomain != "" {
		if _, err := spiffeid.TrustDomainFromString(s.TrustDomain); err != nil {
			return fmt.Errorf("trust domain %q: %w", s.TrustDomain, err)
		}
	}
	if s.Network != "" {
		if err := ValidateName("network", s.Network); err != nil {
			return err
		}
	}
	for _, g := range s.GatewayAddresses {
		if err := ValidateHostPort("gateway address", g); err != nil {
			return err
		}
	}
	return nil
}

// ValidateService checks a service one site exports.
func ValidateService(s Service) error {
	if err := ValidateName("namespace", s.Namespace); err != nil {
		return err
	}
	if err := ValidateName("service name", s.Name); err != nil {
		return fmt.Errorf("%s: %w", s.Namespace, err)
	}
	seen := map[string]bool{}
	for _, p := range s.Ports {
		if p.Port == 0 || p.Port > 65535 {
			return fmt.Errorf("service %s: port %d is out of range 1-65535", s.ID(), p.Port)
		}
		if p.Name != "" {
			if err := ValidateName("port name", p.Name); err != nil {
				return fmt.Errorf("service %s: %w", s.ID(), err)
			}
		}
		if seen[p.Name] {
			return fmt.Errorf("service %s: port name %q is used twice", s.ID(), p.Name)
		}
		seen[p.Name] = true
		switch p.Protocol {
		case "", "TCP", "UDP", "SCTP":
		default:
			return fmt.Errorf("service %s: protocol %q: want TCP, UDP or SCTP", s.ID(), p.Protocol)
		}
	}
	for i, e := range s.Endpoints {
		if err := validateEndpoint(e); err != nil {
			return fmt.Errorf("service %s endpoint %d: %w", s.ID(), i, err)
		}
	}
	return nil
}

func validateEndpoint(e Endpoint) error {
	if err := ValidateHost("endpoint", e.Address); err != nil {
		return err
	}
	if e.Port == 0 || e.Port > 65535 {
		return fmt.Errorf("port %d is out of range 1-65535", e.Port)
	}
	if err := ValidateHealth(e.Health); err != nil {
		return err
	}
	if e.Identity != "" {
		if _, err := spiffeid.FromString(e.Identity); err != nil {
			return fmt.Errorf("identity %q is not a SPIFFE ID: %w", e.Identity, err)
		}
	}
	return nil
}
