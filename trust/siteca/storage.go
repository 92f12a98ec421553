package siteca

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshfed/meshfed/atomicfile"
)

// Storage keeps a site CA's files (ca.key, ca.crt, state.json and, during a
// rotation, next.key and next.crt). Implementations: Dir here, and a
// Kubernetes Secret in spoke/kube for in-cluster spokes.
type Storage interface {
	// Load returns every file stored, or an empty map for a new CA.
	Load() (map[string][]byte, error)
	// Save replaces the stored files with files. A file left out is
	// removed. Key material must never be readable by others.
	Save(files map[string][]byte) error
}

// fileNames are the files a CA may have, in the order Dir writes them:
// keys before the certificates that need them, state before ca.crt, which
// is what Open looks for.
var fileNames = []string{"next.key", "next.crt", "ca.key", "state.json", "ca.crt"}

// Dir stores the CA as files in a directory, each 0600.
type Dir string

var _ Storage = Dir("")

// Load implements Storage.
func (d Dir) Load() (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, n := range fileNames {
		b, err := os.ReadFile(filepath.Join(string(d), n))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("siteca: %w", err)
		}
		out[n] = b
	}
	return out, nil
}

// Save implements Storage.
func (d Dir) Save(files map[string][]byte) error {
	for _, n := range fileNames {
		p := filepath.Join(string(d), n)
		b, ok := files[n]
		if !ok {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("siteca: %w", err)
			}
			continue
		}
		if err := atomicfile.Write(p, b, 0o600); err != nil {
			return fmt.Errorf("siteca: %w", err)
		}
	}
	return nil
}
