package catalog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sort"

	"gopkg.in/yaml.v3"
)

// ServicesFile is the YAML a site's services are listed in when they come
// from a file (the spoke's --services flag):
//
//	services:
//	- namespace: default
//	  name: echo
//	  ports: [{name: http, port: 8080}]
//	  endpoints:
//	  - {address: 10.0.0.7, port: 8080, zone: us-east-1a, labels: {version: v1}}
type ServicesFile struct {
	Services []Service `yaml:"services"`
}

// ErrNoServicesKey is a services file that is empty (or whitespace and
// comments) or lacks the services key. A truncated write, a failed config
// management run or an empty ConfigMap look like that; taking it for "no
// services" would pull the whole site out of the federation, so it is an
// error, and withdrawing every service takes an explicit `services: []`.
var ErrNoServicesKey = errors.New("services file: it is empty or has no services key; to withdraw every service of the site, write `services: []`")

// ParseServicesFile decodes and validates a services file. Unknown fields are
// errors, so a typo does not silently drop an endpoint; so is a file with no
// services key (ErrNoServicesKey). The result is sorted by namespace/name,
// and a service listed twice is an error.
func ParseServicesFile(data []byte) ([]Service, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, ErrNoServicesKey
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var f struct {
		// A pointer tells a missing (or null) key from an empty list.
		Services *[]Service `yaml:"services"`
	}
	err := decodeStrict(dec, &f)
	switch {
	case errors.Is(err, io.EOF) || err == nil && f.Services == nil:
		return nil, ErrNoServicesKey
	case err != nil:
		return nil, fmt.Errorf("services file: %w", err)
	}
	services := *f.Services
	seen := map[string]bool{}
	for i, s := range services {
		if s.Site != "" {
			return nil, fmt.Errorf("services file: service %s: remove the site field, the spoke sets it", s.ID())
		}
		if err := ValidateService(s); err != nil {
			return nil, fmt.Errorf("services file: service %d: %w", i, err)
		}
		if seen[s.ID()] {
			return nil, fmt.Errorf("services file: service %s is listed twice: merge its endpoints into one entry", s.ID())
		}
		seen[s.ID()] = true
		for j := range s.Endpoints {
			if s.Endpoints[j].Site != "" {
				return nil, fmt.Errorf("services file: service %s: remove the endpoint site field, the spoke sets it", s.ID())
			}
		}
	}
	sort.Slice(services, func(i, j int) bool { return services[i].ID() < services[j].ID() })
	return services, nil
}
