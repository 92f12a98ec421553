package catalog

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Site kinds.
const (
	KindKubernetes = "kubernetes"
	KindDocker     = "docker"
	KindConsul     = "consul"
)

// Endpoint health values.
const (
	HealthUnknown   = "unknown"
	HealthHealthy   = "healthy"
	HealthUnhealthy = "unhealthy"
	HealthDraining  = "draining"
)

// LabelNode names the host an endpoint runs on (set by the vmagent, or in
// a services file); a host may get SVIDs only for its own endpoints.
const LabelNode = "meshfed.io/node"

// Site states as the hub sees them.
const (
	StatePending   = "pending"
	StateConnected = "connected"
	StateStale     = "stale"
)

// Locality is where a site or endpoint runs.
type Locality struct {
	Region string `json:"region,omitempty" yaml:"region,omitempty"`
	Zone   string `json:"zone,omitempty" yaml:"zone,omitempty"`
}

// String renders the locality as region/zone.
func (l Locality) String() string {
	if l.Region == "" && l.Zone == "" {
		return "-"
	}
	return l.Region + "/" + l.Zone
}

// Site is one member of the federation.
type Site struct {
	Name             string    `json:"name" yaml:"name"`
	Kind             string    `json:"kind" yaml:"kind"`
	Locality         Locality  `json:"locality" yaml:"locality"`
	Network          string    `json:"network,omitempty" yaml:"network,omitempty"`
	TrustDomain      string    `json:"trustDomain" yaml:"trustDomain"`
	GatewayAddresses []string  `json:"gatewayAddresses,omitempty" yaml:"gatewayAddresses,omitempty"`
	State            string    `json:"state,omitempty" yaml:"state,omitempty"`
	Created          time.Time `json:"created,omitzero" yaml:"created,omitempty"`
	LastSync         time.Time `json:"lastSync,omitzero" yaml:"lastSync,omitempty"`
	ConnectedSince   time.Time `json:"connectedSince,omitzero" yaml:"connectedSince,omitempty"`
	Services         int       `json:"services" yaml:"services"`
	Endpoints        int       `json:"endpoints" yaml:"endpoints"`
	// Source is how the site's local source is doing, as its spoke says:
	// "ok", or what is wrong (the spoke then serves its last good state).
	Source string `json:"source,omitempty" yaml:"source,omitempty"`
	// Gossip is the site's state in the WAN gossip pool as the hub sees it
	// (alive, suspect, dead), next to State, the hub's own view.
	Gossip string `json:"gossip,omitempty" yaml:"gossip,omitempty"`
}

// Port is one port of a service.
type Port struct {
	Name     string `json:"name,omitempty" yaml:"name,omitempty"`
	Port     uint32 `json:"port" yaml:"port"`
	Protocol string `json:"protocol,omitempty" yaml:"protocol,omitempty"`
}

// Endpoint is one instance of a service.
type Endpoint struct {
	Site     string            `json:"site,omitempty" yaml:"site,omitempty"`
	Address  string            `json:"address" yaml:"address"`
	Port     uint32            `json:"port" yaml:"port"`
	PortName string            `json:"portName,omitempty" yaml:"portName,omitempty"`
	Region   string            `json:"region,omitempty" yaml:"region,omitempty"`
	Zone     string            `json:"zone,omitempty" yaml:"zone,omitempty"`
	Health   string            `json:"health,omitempty" yaml:"health,omitempty"`
	Weight   uint32            `json:"weight,omitempty" yaml:"weight,omitempty"`
	Labels   map[string]string `json:"labels,omitempty" yaml:"labels,omitempty"`
	Identity string            `json:"identity,omitempty" yaml:"identity,omitempty"`
}

// Service is what one site offers of a namespace/name.
type Service struct {
	Site      string     `json:"site,omitempty" yaml:"site,omitempty"`
	Namespace string     `json:"namespace" yaml:"namespace"`
	Name      string     `json:"name" yaml:"name"`
	Ports     []Port     `json:"ports,omitempty" yaml:"ports,omitempty"`
	Endpoints []Endpoint `json:"endpoints" yaml:"endpoints"`
}

// SameServices reports whether a and b hold the same services, endpoints
// and fields, in the same order, as they are written down: a nil and an
// empty list of ports or labels are the same (reflect.DeepEqual would
// tell them apart and report a change that is none).
func SameServices(a, b []Service) bool {
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && string(ja) == string(jb)
}

// SortEndpoints orders endpoints by "address:port", the order the host
// agents and the Consul source publish them in, so an unchanged set
// compares equal.
func SortEndpoints(eps []Endpoint) {
	key := func(e Endpoint) string { return e.Address + ":" + strconv.Itoa(int(e.Port)) }
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(key(a), key(b)) })
}

// ID is the service's namespace/name.
func (s Service) ID() string { return s.Namespace + "/" + s.Name }

// ParseServiceID splits "namespace/name" and validates both halves.
func ParseServiceID(id string) (namespace, name string, err error) {
	for i := 0; i < len(id); i++ {
		if id[i] == '/' {
			namespace, name = id[:i], id[i+1:]
			if err := ValidateName("namespace", namespace); err != nil {
				return "", "", err
			}
			if err := ValidateName("service name", name); err != nil {
				return "", "", err
			}
			return namespace, name, nil
		}
	}
	return "", "", fmt.Errorf("service %q: want namespace/name, for example default/echo", id)
}

// SiteView is the federated catalog as one site's spoke sees it: what its
// spoke serves on /v1/catalog.
type SiteView struct {
	Site           string    `json:"site" yaml:"site"`
	HubConnected   bool      `json:"hubConnected" yaml:"hubConnected"`
	Synced         bool      `json:"synced" yaml:"synced"`
	LastHubContact time.Time `json:"lastHubContact,omitzero" yaml:"lastHubContact,omitempty"`
	Sites          []Site    `json:"sites" yaml:"sites"`
	Services       []Service `json:"services" yaml:"services"`
	// TrustDomains are the trust domains whose bundles the site holds.
	TrustDomains []string `json:"trustDomains" yaml:"trustDomains"`
}
