package proxycmd

import (
	"bytes"
	"log/slog"
	"runtime"
	"testing"

	"github.com/spf13/cobra"
)

func TestConcurrencyFlag(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	const goDefault = 4 // as if Go saw four CPUs
	for _, tc := range []struct {
		name       string
		def        int
		spareP     bool
		args       []string
		env        string
		loops      int
		gomaxprocs int
		wantErr    bool
	}{
		{name: "a default makes no more loops than Go's count", def: 6, loops: 4, gomaxprocs: 4},
		{name: "a default lowers it", def: 3, loops: 3, gomaxprocs: 3},
		{name: "0 leaves Go's count", def: 0, loops: 4, gomaxprocs: 4},
		{name: "GOMAXPROCS in the environment stands over a default", def: 3, env: "4", loops: 4, gomaxprocs: 4},
		{name: "the flag stands over the environment", def: 3, env: "4", args: []string{"--concurrency", "5"}, loops: 5, gomaxprocs: 5},
		{name: "the flag may raise it", def: 0, args: []string{"--concurrency", "7"}, loops: 7, gomaxprocs: 7},
		{name: "one loop keeps two Ps", def: 0, args: []string{"--concurrency", "1"}, loops: 1, gomaxprocs: 2},
		{name: "negative", def: 0, args: []string{"--concurrency", "-1"}, wantErr: true, gomaxprocs: 4},
		{name: "a spare P: 0 is Go's count of loops", def: 0, spareP: true, loops: 4, gomaxprocs: 5},
		{name: "a spare P: the environment sets the loops", def: 2, spareP: true, env: "4", loops: 4, gomaxprocs: 5},
		{name: "a spare P: one loop", def: 0, spareP: true, args: []string{"--concurrency", "1"}, loops: 1, gomaxprocs: 2},
		{name: "a spare P: a default", def: 6, spareP: true, loops: 4, gomaxprocs: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runtime.GOMAXPROCS(goDefault)
			t.Setenv("GOMAXPROCS", tc.env)
			cmd := &cobra.Command{}
			apply := ConcurrencyFlag(cmd, tc.def, tc.spareP)
			if err := cmd.ParseFlags(tc.args); err != nil {
				t.Fatal(err)
			}
			loops, err := apply()
			if (err != nil) != tc.wantErr {
				t.Fatalf("apply: %v; want an error: %v", err, tc.wantErr)
			}
			if got := runtime.GOMAXPROCS(0); loops != tc.loops || got != tc.gomaxprocs {
				t.Fatalf("%d loops, GOMAXPROCS %d; want %d and %d", loops, got, tc.loops, tc.gomaxprocs)
			}
		})
	}
}

func TestSliceFlag(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		wantErr bool
	}{
		{args: nil},
		{args: []string{"--cpu-slice", "0"}},
		{args: []string{"--cpu-slice", "-1ms"}, wantErr: true},
	} {
		cmd := &cobra.Command{}
		apply := SliceFlag(cmd, 0)
		if err := cmd.ParseFlags(tc.args); err != nil {
			t.Fatal(err)
		}
		var log bytes.Buffer
		err := apply(slog.New(slog.NewTextHandler(&log, nil)))
		if (err != nil) != tc.wantErr {
			t.Errorf("%v: %v; want an error: %v", tc.args, err, tc.wantErr)
		}
		if log.Len() > 0 {
			t.Errorf("%v: logged %q; a slice left to the kernel is not worth a line", tc.args, log.String())
		}
	}
}
