package spoke

import (
	"fmt"
	"testing"

	"github.com/meshfed/meshfed/catalog"
)

func echo(addrs ...string) catalog.Service {
	s := catalog.Service{Namespace: "default", Name: "echo", Ports: []catalog.Port{{Name: "tcp", Port: 8080}}}
	for _, a := range addrs {
		s.Endpoints = append(s.Endpoints, catalog.Endpoint{Address: a, Port: 8080})
	}
	return s
}

func addresses(l *Local) []string {
	var out []string
	for _, s := range l.Services() {
		for _, e := range s.Endpoints {
			out = append(out, s.Name+"@"+e.Address)
		}
	}
	return out
}

// The source and each host add up to one service; a host's report
// replaces only its own part, and removing it leaves the rest.
func TestLocalMergesSourceAndHosts(t *testing.T) {
	l := NewLocal("dc1")
	l.Replace([]catalog.Service{echo("10.0.0.1")})
	l.SetHost("h1", []catalog.Service{echo("10.0.1.1", "10.0.1.2")})
	l.SetHost("h2", []catalog.Service{echo("10.0.2.1")})
	want := "[echo@10.0.0.1 echo@10.0.1.1 echo@10.0.1.2 echo@10.0.2.1]"
	if got := fmt.Sprint(addresses(l)); got != want {
		t.Fatalf("merged: %s, want %s", got, want)
	}
	l.SetHost("h1", []catalog.Service{echo("10.0.1.2")})
	if got, want := fmt.Sprint(addresses(l)), "[echo@10.0.0.1 echo@10.0.1.2 echo@10.0.2.1]"; got != want {
		t.Fatalf("after h1's second report: %s, want %s", got, want)
	}
	l.Replace(nil)
	l.RemoveHost("h2")
	if got, want := fmt.Sprint(addresses(l)), "[echo@10.0.1.2]"; got != want {
		t.Fatalf("after the source emptied and h2 left: %s, want %s", got, want)
	}
	l.SetHost("h1", nil)
	if got := addresses(l); len(got) != 0 {
		t.Fatalf("nothing reports echo, yet it is published: %v", got)
	}
}
