package vmagent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"time"

	"github.com/meshfed/meshfed/catalog"
)

// loadStatic reads the static services file; on an error the last valid
// content stays. changed reports whether the content differs from before.
func (a *Agent) loadStatic() (changed bool, err error) {
	data, err := os.ReadFile(a.o.StaticServices)
	if err != nil {
		return false, fmt.Errorf("static services %s: %w", a.o.StaticServices, err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		// A file caught mid-write, or emptied by mistake, must not
		// withdraw the host's services: say "services: []" to mean none.
		return false, fmt.Errorf("static services %s is empty: write \"services: []\" to export none", a.o.StaticServices)
	}
	services, err := catalog.ParseServicesFile(data)
	if err != nil {
		return false, fmt.Errorf("static services %s: %w", a.o.StaticServices, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	changed = !catalog.SameServices(a.static, services)
	a.static = services
	return changed, nil
}

// staticLoop reloads the static services file every 2s.
func (a *Agent) staticLoop(ctx context.Context) error {
	var last string
	for sleep(ctx, 2*time.Second) {
		changed, err := a.loadStatic()
		switch {
		case err != nil && err.Error() != last:
			a.m.staticErrors.Inc()
			a.log.Error("static services not reloaded; the last valid ones stay", "err", err)
			last = err.Error()
		case err == nil:
			last = ""
			if changed {
				a.poke()
			}
		}
	}
	return nil
}
