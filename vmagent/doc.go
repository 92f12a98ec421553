// Package vmagent will hold the agent for bare Docker/VM hosts (`meshfed
// vmagent`): it joins with a one-time token, discovers labelled containers
// through the Docker Engine API and runs the host proxy. It is not built
// yet; see the README's "What works today".
package vmagent
