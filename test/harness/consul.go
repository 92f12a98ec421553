package harness

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Consul is a one-server Consul datacenter on loopback, its state in a
// temp dir, so a restart keeps it (as a real one does; dev mode would
// start empty).
type Consul struct {
	Addr   string // the HTTP API, host:port
	DNS    string // the DNS interface, host:port
	Client *api.Client
	proc   *Process
	args   []string
	t      testing.TB
	bin    string
}

// ConsulBinary returns the pinned consul, building it into the tools
// cache the first time (test/consul.sh).
func ConsulBinary(t testing.TB) string { return toolBinary(t, "consul.sh") }

// StartConsul starts `consul agent -server -bootstrap-expect 1` with every
// port its own and waits until it has a leader.
func StartConsul(t testing.TB, datacenter string) *Consul { return startConsul(t, datacenter, "") }

// StartConsulACL is StartConsul with ACLs on, denying by default; its
// Client holds the management token.
func StartConsulACL(t testing.TB, datacenter string) *Consul {
	return startConsul(t, datacenter, Unique("management"))
}

func startConsul(t testing.TB, datacenter, management string) *Consul {
	t.Helper()
	c := &Consul{t: t, bin: ConsulBinary(t), Addr: FreePort(t), DNS: FreePort(t)}
	port := func(hp string) string { _, p, _ := strings.Cut(hp, ":"); return p }
	c.args = []string{"agent", "-server", "-bootstrap-expect", "1", "-data-dir", t.TempDir(), "-ui=false",
		"-datacenter", datacenter, "-node", "consul-" + datacenter, "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", port(c.Addr), "-dns-port", port(c.DNS), "-grpc-port", port(FreePort(t)),
		"-server-port", port(FreePort(t)), "-serf-lan-port", port(FreePort(t)), "-serf-wan-port", port(FreePort(t)),
		// Raft at its fastest, as dev mode has it: a leader within a second.
		"-hcl", `ports { grpc_tls = -1 }`, "-hcl", `performance { raft_multiplier = 1 }`, "-log-level", "warn"}
	if management != "" {
		c.args = append(c.args, "-hcl", `acl { enabled = true, default_policy = "deny", tokens { initial_management = "`+management+`" } }`)
	}
	cfg := api.DefaultConfig()
	cfg.Address = "http://" + c.Addr
	cfg.Token = management
	var err error
	if c.Client, err = api.NewClient(cfg); err != nil {
		t.Fatal(err)
	}
	c.Start()
	return c
}

// Start starts the agent (again, after Stop, on its state).
func (c *Consul) Start() {
	c.t.Helper()
	c.proc = Start(c.t, "consul", c.bin, c.args...)
	Eventually(c.t, 30*time.Second, "consul has a leader", func() error {
		_, err := c.Client.Status().Leader()
		return err
	})
}

// Stop kills the agent.
func (c *Consul) Stop() { c.proc.Kill() }
