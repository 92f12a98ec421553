package atomicfile_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/meshfed/meshfed/atomicfile"
)

func TestPrivateDir(t *testing.T) {
	loose := filepath.Join(t.TempDir(), "loose")
	if err := os.Mkdir(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o755); err != nil { // whatever the umask
		t.Fatal(err)
	}
	fresh := filepath.Join(t.TempDir(), "a", "b")
	for _, c := range []struct {
		dir       string
		tightened bool
	}{{loose, true}, {loose, false}, {fresh, false}} {
		tightened, err := atomicfile.PrivateDir(c.dir)
		if err != nil {
			t.Fatal(err)
		}
		info, err := os.Stat(c.dir)
		if err != nil || info.Mode().Perm() != 0o700 || tightened != c.tightened {
			t.Errorf("%s: mode %v, tightened %v (%v); want 0700, tightened %v", c.dir, info.Mode().Perm(), tightened, err, c.tightened)
		}
	}
}
