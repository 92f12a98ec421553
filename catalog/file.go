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

// ParseServicesFile decodes and validates a services file. Unknown fields are
// errors, so a typo does not silently drop an endpoint. The result is sorted
// by namespace/name, and a service listed twice is an error.
func ParseServicesFile(data []byte) ([]Service, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var f ServicesFile
	if err := decodeStrict(dec, &f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("services file: %w", err)
	}
	seen := map[string]bool{}
	for i, s := range f.Services {
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
	sort.Slice(f.Services, func(i, j int) bool { return f.Services[i].ID() < f.Services[j].ID() })
	return f.Services, nil
}
