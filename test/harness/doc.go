// Package harness starts the real parts meshfed's tests run against (etcd,
// the built meshfed binary) as processes on loopback, and stops them and
// removes their files when the test ends, failed or not.
package harness
