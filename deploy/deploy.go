// Package deploy holds what meshfed installs into sites: the Kubernetes
// manifests (kubernetes/), embedded so `meshfed cluster register` applies
// exactly the files in this directory.
package deploy

import (
	"bytes"
	"embed"
	"fmt"
	"text/template"
)

//go:embed kubernetes/*.yaml
var files embed.FS

// KubernetesParams fill the spoke manifests.
type KubernetesParams struct {
	Site, Hub, Token, Image string
}

// MCSCRDs are the Multi-Cluster Services CRDs, for clusters without them.
func MCSCRDs() []byte {
	b, err := files.ReadFile("kubernetes/mcs-crds.yaml")
	if err != nil {
		panic(err) // embedded at build time
	}
	return b
}

// KubernetesSpoke renders the spoke and gateway manifests.
func KubernetesSpoke(p KubernetesParams) ([]byte, error) {
	t, err := template.ParseFS(files, "kubernetes/spoke.yaml")
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := t.Execute(&out, p); err != nil {
		return nil, fmt.Errorf("deploy: render spoke manifests: %w", err)
	}
	return out.Bytes(), nil
}
