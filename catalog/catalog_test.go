package catalog_test

import (
	"testing"

	"github.com/meshfed/meshfed/catalog"
)

func TestSameServices(t *testing.T) {
	ep := catalog.Endpoint{Address: "10.0.0.1", Port: 80}
	svc := func(eps ...catalog.Endpoint) []catalog.Service {
		return []catalog.Service{{Namespace: "default", Name: "echo", Endpoints: eps}}
	}
	labelled := ep
	labelled.Labels = map[string]string{}
	other := ep
	other.Port = 81
	for _, c := range []struct {
		name string
		a, b []catalog.Service
		same bool
	}{
		{"equal lists are the same", svc(ep), svc(ep), true},
		{"an empty and a nil label map are the same", svc(ep), svc(labelled), true},
		{"a changed port is a change", svc(ep), svc(other), false},
		{"an added endpoint is a change", svc(ep), svc(ep, other), false},
		{"a withdrawn service is a change", svc(ep), nil, false},
	} {
		if got := catalog.SameServices(c.a, c.b); got != c.same {
			t.Errorf("%s: SameServices = %v, want %v", c.name, got, c.same)
		}
	}
}
