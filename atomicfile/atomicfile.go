// Package atomicfile writes files whole or not at all: through a temp file
// in the same directory, fsync and rename, with the mode set before any
// byte is written, so a secret is never readable by others even briefly.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Write writes data to path through a temp file, fsync and
// rename, so a crash leaves the old file or the new one, never half.
func Write(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// dataLink is the symlink in a WriteSet directory that names the current
// version of the set.
const dataLink = "..data"

// WriteSet replaces the files in dir all at once, as the kubelet updates a
// projected volume: the new versions go to a fresh hidden directory, the
// symlink ..data is switched to it with one rename, and each name in dir is
// a symlink through ..data. A reader never finds files of two versions,
// unless the switch falls between two of its reads. Regular files of the
// same names (an older layout) become symlinks; earlier versions are
// removed. Files get mode; the directories are 0700.
func WriteSet(dir string, files map[string][]byte, mode os.FileMode) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	version, err := os.MkdirTemp(dir, "..v")
	if err != nil {
		return fmt.Errorf("write the files in %s: %w", dir, err)
	}
	for name, data := range files {
		if filepath.Base(name) != name || name == dataLink {
			os.RemoveAll(version)
			return fmt.Errorf("write %q in %s: not a plain file name", name, dir)
		}
		if err := Write(filepath.Join(version, name), data, mode); err != nil {
			os.RemoveAll(version)
			return err
		}
	}
	if err := replaceLink(dir, dataLink, filepath.Base(version)); err != nil {
		os.RemoveAll(version)
		return err
	}
	for name := range files {
		target := filepath.Join(dataLink, name)
		if cur, err := os.Readlink(filepath.Join(dir, name)); err == nil && cur == target {
			continue
		}
		if err := replaceLink(dir, name, target); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("clean up %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), "..v") && e.Name() != filepath.Base(version) {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("remove an earlier version of the files: %w", err)
			}
		}
	}
	return nil
}

// replaceLink makes dir/name a symlink to target with one rename.
func replaceLink(dir, name, target string) error {
	tmp := filepath.Join(dir, "..tmp-"+name)
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("link %s: %w", filepath.Join(dir, name), err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("link %s: %w", filepath.Join(dir, name), err)
	}
	return nil
}

// PrivateDir makes dir (and its parents) for secrets: 0700. An existing
// dir that others may read or enter is tightened to 0700, and tightened
// says so, for the caller to log: a data dir made 0755 by hand or by a
// config manager would otherwise expose the keys kept in it to every
// local user who can guess a file's name.
func PrivateDir(dir string) (tightened bool, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, err
	}
	info, err := os.Stat(dir)
	if err != nil {
		return false, err
	}
	if info.Mode().Perm()&0o077 == 0 {
		return false, nil
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return false, fmt.Errorf("%s is open to other users (mode %v) and could not be made 0700: %w: chmod 700 it", dir, info.Mode().Perm(), err)
	}
	return true, nil
}
