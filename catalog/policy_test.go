package catalog_test

import (
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
)

func TestParsePolicies(t *testing.T) {
	full := `service: default/echo
failover: [east, west]
split:
- {name: stable, weight: 90, labels: {version: v1}}
- {name: canary, weight: 10, labels: {version: v2}, site: west}
connectTimeout: 1s
retries: 2
outlierDetection: {consecutiveFailures: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}
allow: [spiffe://c.meshfed/ns/default/sa/client, "spiffe://east.meshfed/ns/payments/*"]
`
	checkParse(t, catalog.ParsePolicies, []parseCase{
		{"the documented example parses", full, "", 1},
		{"several documents", "service: default/a\n---\nservice: default/b\n", "", 2},
		{"an outlier block may set one field", "service: default/a\noutlierDetection: {maxEjectionPercent: 50}\n", "", 1},
		{"an empty file is an error", "", "no policy in the file", 0},
		{"a service without namespace", "service: echo\n", "want namespace/name", 0},
		{"an unknown field", "service: default/a\nfailovr: [east]\n", `line 2: unknown field "failovr" (the fields there: service, failover, split, `, 0},
		{"an unknown field in a nested block", "service: default/a\noutlierDetection:\n  consecutiveFailure: 3\n", `line 3: unknown field "consecutiveFailure" (the fields there: consecutiveFailures, interval, baseEjectionTime, maxEjectionPercent)`, 0},
		{"a failover site twice", "service: default/a\nfailover: [east, east]\n", "lists site east twice", 0},
		{"a failover site that is no name", "service: default/a\nfailover: [East Coast]\n", "DNS-1123", 0},
		{"weights over 100", "service: default/a\nsplit:\n- {name: a, weight: 90, labels: {v: '1'}}\n- {name: b, weight: 20, labels: {v: '2'}}\n", "add up to 110", 0},
		{"a split selecting everything", "service: default/a\nsplit:\n- {name: a, weight: 100}\n", "selects every endpoint", 0},
		{"a split name twice", "service: default/a\nsplit:\n- {name: a, weight: 50, site: x}\n- {name: a, weight: 50, site: y}\n", "used twice", 0},
		{"a duration without unit", "service: default/a\nconnectTimeout: 1x\n", "is no duration", 0},
		{"a negative timeout", "service: default/a\nconnectTimeout: -1s\n", "negative", 0},
		{"too many retries", "service: default/a\nretries: 11\n", "more than 10", 0},
		{"ejecting over 100 %", "service: default/a\noutlierDetection: {maxEjectionPercent: 150}\n", "more than 100", 0},
		{"a negative ejection time", "service: default/a\noutlierDetection: {baseEjectionTime: -1s}\n", "must not be negative", 0},
		{"a caller that is no SPIFFE ID", "service: default/a\nallow: [http://foo]\n", "want a SPIFFE ID", 0},
		{"a service twice", "service: default/b\n---\nservice: default/b\n", "has a policy earlier", 0},
	})

	got, err := catalog.ParsePolicies([]byte(full))
	if err != nil {
		t.Fatal(err)
	}
	p := got[0]
	if p.Service != "default/echo" || len(p.Split) != 2 || p.Split[1].Site != "west" || *p.Retries != 2 ||
		time.Duration(p.ConnectTimeout) != time.Second || p.OutlierDetection.ConsecutiveFailures != 3 ||
		time.Duration(p.OutlierDetection.BaseEjectionTime) != 30*time.Second || len(p.Allow) != 2 {
		t.Errorf("the documented example parses as %+v", p)
	}
}
