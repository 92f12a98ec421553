package catalog_test

import (
	"strings"
	"testing"

	"github.com/meshfed/meshfed/catalog"
)

func TestParseServicesFile(t *testing.T) {
	checkParse(t, catalog.ParseServicesFile, []parseCase{
		{"a valid file parses", "services:\n- {namespace: default, name: echo, endpoints: [{address: 10.0.0.1, port: 80}]}\n", "", 1},
		{"an empty file is an error, not an empty catalog", "", "services: []", 0},
		{"a whitespace-only file is an error", " \n\t\n", "services: []", 0},
		{"a comment-only file is an error", "# services to come\n", "services: []", 0},
		{"a file without a services key is an error", "{}\n", "no services key", 0},
		{"a null services key is an error", "services:\n", "no services key", 0},
		{"an explicit empty list withdraws everything", "services: []\n", "", 0},
		{"an unknown field is an error", "services:\n- {namespace: default, name: echo, endpoints: [{address: 10.0.0.1, port: 80, helth: ok}]}\n", `line 2: unknown field "helth" (the fields there: site, address, port, `, 0},
		{"an invalid namespace is an error", "services:\n- {namespace: Default, name: echo, endpoints: []}\n", "DNS-1123", 0},
		{"a service listed twice is an error", "services:\n- {namespace: a, name: b, endpoints: []}\n- {namespace: a, name: b, endpoints: []}\n", "listed twice", 0},
		{"a port out of range is an error", "services:\n- {namespace: a, name: b, endpoints: [{address: 10.0.0.1, port: 70000}]}\n", "out of range", 0},
		{"an unknown health is an error", "services:\n- {namespace: a, name: b, endpoints: [{address: 10.0.0.1, port: 80, health: sick}]}\n", "health", 0},
		{"a bad identity is an error", "services:\n- {namespace: a, name: b, endpoints: [{address: 10.0.0.1, port: 80, identity: nope}]}\n", "SPIFFE", 0},
		{"a hostname address is fine", "services:\n- {namespace: a, name: b, endpoints: [{address: db.example.com, port: 5432}]}\n", "", 1},
		{"the site field is the spoke's", "services:\n- {site: x, namespace: a, name: b, endpoints: []}\n", "site field", 0},
	})
}

// parseCase is one input to a parser: the error it must give (a part of
// its text), or else how many items it must return.
type parseCase struct {
	name, yaml, err string
	n               int
}

func checkParse[T any](t *testing.T, parse func([]byte) ([]T, error), cases []parseCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parse([]byte(tc.yaml))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil || len(got) != tc.n {
				t.Fatalf("got %d, %v; want %d", len(got), err, tc.n)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"east", "a", "us-east-1", strings.Repeat("a", 63)} {
		if err := catalog.ValidateName("site", ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "East", "-east", "east-", "e_st", "e.st", strings.Repeat("a", 64)} {
		if err := catalog.ValidateName("site", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// FuzzParseServicesFile: whatever the bytes, parsing returns a catalog that
// validates, or an error; it never panics.
func FuzzParseServicesFile(f *testing.F) {
	f.Add([]byte("services:\n- {namespace: default, name: echo, ports: [{name: http, port: 80}], endpoints: [{address: 10.0.0.1, port: 80, labels: {version: v1}}]}\n"))
	f.Add([]byte("services: [{namespace: a, name: b, endpoints: [{address: '::1', port: 1, health: draining, weight: 3}]}]"))
	f.Add([]byte("services: {"))
	f.Fuzz(func(t *testing.T, data []byte) {
		services, err := catalog.ParseServicesFile(data)
		if err != nil {
			return
		}
		for _, s := range services {
			if err := catalog.ValidateService(s); err != nil {
				t.Fatalf("parsed service does not validate: %v", err)
			}
		}
	})
}
