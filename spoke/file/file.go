// Package file feeds a spoke's local catalog from a YAML services file
// (catalog.ServicesFile), watching it for changes. An invalid file is
// reported and ignored: the last valid content stays published.
package file

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke"
)

var _ spoke.Source = (*Source)(nil)

// Options configures a Source.
type Options struct {
	Path string
	// Interval is how often the file is checked. Default 1s: polling
	// survives editors and config managers that replace the file by rename,
	// which inotify watches lose.
	Interval time.Duration
	Logger   *slog.Logger
	// OnError is called with each invalid version of the file.
	OnError func(error)
}

// Source is a services file.
type Source struct{ o Options }

// New returns a Source for o.Path.
func New(o Options) *Source {
	if o.Interval == 0 {
		o.Interval = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Source{o: o}
}

// Load parses the file once.
func (s *Source) Load() ([]catalog.Service, error) {
	b, err := os.ReadFile(s.o.Path)
	if err != nil {
		return nil, err
	}
	return catalog.ParseServicesFile(b)
}

// Run publishes the file's services now and whenever the file changes.
func (s *Source) Run(ctx context.Context, local *spoke.Local) error {
	var last []byte
	lastErr := ""
	t := time.NewTicker(s.o.Interval)
	defer t.Stop()
	for {
		b, err := os.ReadFile(s.o.Path)
		switch {
		case err != nil:
			if err.Error() != lastErr {
				lastErr = err.Error()
				s.fail(local, err)
			}
		case !bytes.Equal(b, last):
			last = b
			services, err := catalog.ParseServicesFile(b)
			if err != nil {
				lastErr = err.Error()
				s.fail(local, err)
				break
			}
			lastErr = ""
			local.Replace(services)
			local.SetSourceStatus(true, "")
			s.o.Logger.Info("services file loaded", "path", s.o.Path, "services", len(services))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// fail reports an unreadable or invalid file: in the log, at the hub
// (site list's SOURCE) and to OnError; the last valid content stays.
func (s *Source) fail(local *spoke.Local, err error) {
	s.o.Logger.Error("services file is invalid; still publishing its last valid content", "path", s.o.Path, "err", err)
	local.SetSourceStatus(false, fmt.Sprintf("services file %s: %v; serving its last valid content", s.o.Path, err))
	if s.o.OnError != nil {
		s.o.OnError(err)
	}
}
