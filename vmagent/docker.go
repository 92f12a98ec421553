package vmagent

import (
	"context"
	"fmt"
	"strings"
	"time"

	dockercontainer "github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
)

// Container labels the agent reads.
const (
	LabelService   = "meshfed.io/service"   // required: the service name
	LabelPort      = "meshfed.io/port"      // the port the app listens on in the container
	LabelNamespace = "meshfed.io/namespace" // default "default"
	LabelVersion   = "meshfed.io/version"   // becomes the endpoint label "version"
	LabelHealth    = "meshfed.io/health"    // an HTTP path checked when the image has no HEALTHCHECK
	LabelNetwork   = "meshfed.io/network"   // the Docker network whose address is the endpoint's
	LabelPrefix    = "meshfed.io/label."    // meshfed.io/label.<k>=<v> becomes the endpoint label <k>
)

// container is what the agent knows of one container.
type container struct {
	ID     string
	Name   string
	Labels map[string]string
	// Running is false for a created, exited or dead container.
	Running bool
	Paused  bool
	// DockerHealth is the image's HEALTHCHECK status ("starting",
	// "healthy", "unhealthy"), empty without one.
	DockerHealth string
	// IPs are the container's addresses by Docker network.
	IPs map[string]string
}

// docker watches the Docker Engine: the container list once, then the
// events stream, re-inspecting a container on each of its events.
type docker struct {
	cli *client.Client
}

func newDocker(host string) (*docker, error) {
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if host != "" {
		opts = append(opts, client.WithHost(host))
	}
	cli, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return &docker{cli: cli}, nil
}

func (d *docker) Close() error { return d.cli.Close() }

// list returns every container (running or not) by ID.
func (d *docker) list(ctx context.Context) (map[string]container, error) {
	cs, err := d.cli.ContainerList(ctx, dockercontainer.ListOptions{All: true})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	out := make(map[string]container, len(cs))
	for _, c := range cs {
		// The list has no health; a labelled container is inspected.
		if c.Labels[LabelService] != "" {
			got, ok, err := d.inspect(ctx, c.ID)
			if err != nil {
				return nil, err
			}
			if ok {
				out[c.ID] = got
			}
			continue
		}
		out[c.ID] = container{ID: c.ID, Labels: c.Labels, Running: c.State == "running"}
	}
	return out, nil
}

// inspect reads one container; ok is false when it no longer exists.
func (d *docker) inspect(ctx context.Context, id string) (container, bool, error) {
	ci, err := d.cli.ContainerInspect(ctx, id)
	if client.IsErrNotFound(err) {
		return container{}, false, nil
	}
	if err != nil {
		return container{}, false, fmt.Errorf("inspect container %.12s: %w", id, err)
	}
	c := container{ID: ci.ID, Name: strings.TrimPrefix(ci.Name, "/"), IPs: map[string]string{}}
	if ci.Config != nil {
		c.Labels = ci.Config.Labels
	}
	if st := ci.State; st != nil {
		c.Running, c.Paused = st.Running, st.Paused
		if st.Health != nil {
			c.DockerHealth = string(st.Health.Status)
		}
	}
	if ci.NetworkSettings != nil {
		for name, n := range ci.NetworkSettings.Networks {
			if n != nil && n.IPAddress != "" {
				c.IPs[name] = n.IPAddress
			}
		}
	}
	return c, true, nil
}

// watch streams container events from since until ctx ends or the stream
// breaks; each event's container ID and time go to on.
func (d *docker) watch(ctx context.Context, since time.Time, on func(id string, at time.Time)) error {
	f := filters.NewArgs(filters.Arg("type", string(events.ContainerEventType)))
	msgs, errs := d.cli.Events(ctx, events.ListOptions{Filters: f, Since: fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond())})
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errs:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("docker events: %w", err)
		case m := <-msgs:
			on(m.Actor.ID, time.Unix(0, m.TimeNano))
		}
	}
}
