package catalog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"gopkg.in/yaml.v3"
)

// Policy is how proxies route to and admit callers of one service, as
// written in a policy file (`meshfed policy apply -f FILE`):
//
//	service: default/echo
//	failover: [east, west]
//	split:
//	- {name: stable, weight: 90, labels: {version: v1}}
//	- {name: canary, weight: 10, labels: {version: v2}}
//	connectTimeout: 1s
//	retries: 2
//	outlierDetection: {consecutiveFailures: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}
//	allow: [spiffe://west.example/ns/default/sa/client]
type Policy struct {
	Service          string            `json:"service" yaml:"service"`
	Failover         []string          `json:"failover,omitempty" yaml:"failover,omitempty"`
	Split            []Split           `json:"split,omitempty" yaml:"split,omitempty"`
	ConnectTimeout   Duration          `json:"connectTimeout,omitempty" yaml:"connectTimeout,omitempty"`
	Retries          *uint32           `json:"retries,omitempty" yaml:"retries,omitempty"`
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty" yaml:"outlierDetection,omitempty"`
	// Allow lists the SPIFFE IDs that may call the service; "…/*" allows
	// every ID under the prefix. With a policy, every other caller is
	// refused.
	Allow []string `json:"allow,omitempty" yaml:"allow,omitempty"`
	// OverprovisioningFactor is Envoy's, in percent (default 140): a
	// priority keeps all traffic while 1/1.4 of its endpoints are healthy.
	OverprovisioningFactor uint32 `json:"overprovisioningFactor,omitempty" yaml:"overprovisioningFactor,omitempty"`
}

// Split is one weighted subset of a service's endpoints.
type Split struct {
	Name   string            `json:"name" yaml:"name"`
	Weight uint32            `json:"weight" yaml:"weight"`
	Site   string            `json:"site,omitempty" yaml:"site,omitempty"`
	Labels map[string]string `json:"labels,omitempty" yaml:"labels,omitempty"`
}

// OutlierDetection ejects endpoints after consecutive connect failures,
// for BaseEjectionTime times the number of ejections so far. A field left
// out (or 0) takes the default the spoke applies without a policy.
type OutlierDetection struct {
	ConsecutiveFailures uint32   `json:"consecutiveFailures,omitempty" yaml:"consecutiveFailures,omitempty"`
	Interval            Duration `json:"interval,omitempty" yaml:"interval,omitempty"`
	BaseEjectionTime    Duration `json:"baseEjectionTime,omitempty" yaml:"baseEjectionTime,omitempty"`
	MaxEjectionPercent  uint32   `json:"maxEjectionPercent,omitempty" yaml:"maxEjectionPercent,omitempty"`
}

// Duration is a time.Duration written as "1s" in YAML and JSON.
type Duration time.Duration

// UnmarshalYAML reads "1.5s"-style durations.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is no duration: write it like 1s or 250ms", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as "1s".
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// MarshalText writes the duration as "1s" (JSON).
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText reads "1s" (JSON).
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// ParsePolicies decodes one or more policies (YAML documents separated by
// ---) and validates each. Unknown fields are errors.
func ParsePolicies(data []byte) ([]Policy, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var out []Policy
	seen := map[string]bool{}
	for i := 1; ; i++ {
		var p Policy
		err := decodeStrict(dec, &p)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("policy %d: %w", i, err)
		}
		if err := ValidatePolicy(p); err != nil {
			return nil, fmt.Errorf("policy %d: %w", i, err)
		}
		if seen[p.Service] {
			return nil, fmt.Errorf("policy %d: service %s has a policy earlier in the file: one policy per service", i, p.Service)
		}
		seen[p.Service] = true
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, errors.New("no policy in the file: want at least `service: namespace/name`")
	}
	return out, nil
}

// ValidatePolicy checks a policy and says what to fix.
func ValidatePolicy(p Policy) error {
	if _, _, err := ParseServiceID(p.Service); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, s := range p.Failover {
		if err := ValidateName("failover site", s); err != nil {
			return fmt.Errorf("%s: %w", p.Service, err)
		}
		if seen[s] {
			return fmt.Errorf("%s: failover lists site %s twice", p.Service, s)
		}
		seen[s] = true
	}
	var total uint32
	names := map[string]bool{}
	for i, s := range p.Split {
		if err := ValidateName("split name", s.Name); err != nil {
			return fmt.Errorf("%s: split %d: %w", p.Service, i, err)
		}
		if names[s.Name] {
			return fmt.Errorf("%s: split name %s is used twice", p.Service, s.Name)
		}
		names[s.Name] = true
		if s.Site != "" {
			if err := ValidateName("split site", s.Site); err != nil {
				return fmt.Errorf("%s: split %s: %w", p.Service, s.Name, err)
			}
		}
		if s.Site == "" && len(s.Labels) == 0 {
			return fmt.Errorf("%s: split %s selects every endpoint: give it labels (such as version: v2) or a site", p.Service, s.Name)
		}
		total += s.Weight
	}
	if len(p.Split) > 0 && total != 100 {
		return fmt.Errorf("%s: split weights add up to %d: they must add up to 100", p.Service, total)
	}
	if p.ConnectTimeout < 0 {
		return fmt.Errorf("%s: connectTimeout is negative", p.Service)
	}
	if p.Retries != nil && *p.Retries > 10 {
		return fmt.Errorf("%s: retries %d is more than 10: a connect failure should not fan out that far", p.Service, *p.Retries)
	}
	if o := p.OutlierDetection; o != nil {
		if o.MaxEjectionPercent > 100 {
			return fmt.Errorf("%s: outlierDetection.maxEjectionPercent %d is more than 100", p.Service, o.MaxEjectionPercent)
		}
		if o.Interval < 0 || o.BaseEjectionTime < 0 {
			return fmt.Errorf("%s: outlierDetection durations must not be negative", p.Service)
		}
	}
	for _, a := range p.Allow {
		id := strings.TrimSuffix(a, "/*")
		if _, err := spiffeid.FromString(id); err != nil {
			if _, err2 := spiffeid.TrustDomainFromString(id); err2 != nil || !strings.HasSuffix(a, "/*") {
				return fmt.Errorf("%s: allow %q: want a SPIFFE ID, or a prefix ending in /*: %w", p.Service, a, err)
			}
		}
	}
	if p.OverprovisioningFactor != 0 && p.OverprovisioningFactor < 100 {
		return fmt.Errorf("%s: overprovisioningFactor %d is below 100 (it is in percent; Envoy's default is 140)", p.Service, p.OverprovisioningFactor)
	}
	return nil
}
