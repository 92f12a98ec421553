package atomicfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteSet(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	// An older layout: a regular file where the set puts a link.
	if err := Write(filepath.Join(dir, "cert.pem"), []byte("old cert"), 0o600); err != nil {
		t.Fatal(err)
	}
	read := func(name string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, v := range []string{"1", "2"} {
		if err := WriteSet(dir, map[string][]byte{"cert.pem": []byte("cert " + v), "key.pem": []byte("key " + v)}, 0o600); err != nil {
			t.Fatal(err)
		}
		if c, k := read("cert.pem"), read("key.pem"); c != "cert "+v || k != "key "+v {
			t.Fatalf("version %s: cert %q, key %q", v, c, k)
		}
		for _, name := range []string{"cert.pem", "key.pem"} {
			if link, err := os.Readlink(filepath.Join(dir, name)); err != nil || link != filepath.Join(dataLink, name) {
				t.Errorf("%s links to %q (%v), want through %s", name, link, err, dataLink)
			}
			if st, err := os.Stat(filepath.Join(dir, name)); err != nil || st.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v (%v), want 0600", name, st.Mode().Perm(), err)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var versions []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..v") {
			versions = append(versions, e.Name())
		}
		if strings.HasPrefix(e.Name(), "..tmp") || strings.HasPrefix(e.Name(), ".cert") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if len(versions) != 1 {
		t.Errorf("versions kept: %v, want only the current one", versions)
	}
	if err := WriteSet(dir, map[string][]byte{"../escape": nil}, 0o600); err == nil {
		t.Error("a name with a path in it was accepted")
	}
}
