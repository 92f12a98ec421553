package proxycmd

import (
	"runtime"
	"testing"

	"github.com/spf13/cobra"
)

func TestConcurrencyFlag(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	goDefault := runtime.GOMAXPROCS(0)
	for _, tc := range []struct {
		name    string
		def     int
		args    []string
		env     string
		want    int
		wantErr bool
	}{
		{name: "a default never raises Go's count", def: goDefault + 5, want: goDefault},
		{name: "a default lowers it", def: 1, want: 1},
		{name: "0 leaves Go's count", def: 0, want: goDefault},
		{name: "GOMAXPROCS in the environment stands over a default", def: 1, env: "3", want: goDefault},
		{name: "the flag stands over the environment", def: 1, env: "3", args: []string{"--concurrency", "5"}, want: 5},
		{name: "the flag may raise it", def: 0, args: []string{"--concurrency", "7"}, want: 7},
		{name: "negative", def: 0, args: []string{"--concurrency", "-1"}, wantErr: true, want: goDefault},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runtime.GOMAXPROCS(goDefault)
			t.Setenv("GOMAXPROCS", tc.env)
			cmd := &cobra.Command{}
			apply := ConcurrencyFlag(cmd, tc.def)
			if err := cmd.ParseFlags(tc.args); err != nil {
				t.Fatal(err)
			}
			if err := apply(); (err != nil) != tc.wantErr {
				t.Fatalf("apply: %v; want an error: %v", err, tc.wantErr)
			}
			if got := runtime.GOMAXPROCS(0); got != tc.want {
				t.Fatalf("GOMAXPROCS %d, want %d", got, tc.want)
			}
		})
	}
}
