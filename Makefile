# meshfed — see README.md. `make demo` runs a local federation, `make test`
# runs every test against the real parts (installing what it needs first).
GO        ?= go
BIN       := bin/meshfed
VERSION   ?= dev
PROTOS    := $(wildcard api/meshfed/v1/*.proto api/meshfed/xdsapi/*.proto)
GEN_OUT   ?= api
# grpcnotrace leaves out grpc's x/net/trace (and html/template with it),
# which meshfed never enables: less binary, less proxy memory. The test
# harness builds with the same tags.
TAGS      := grpcnotrace
export GOTOOLCHAIN := local
export CGO_ENABLED := 0

.PHONY: all build image vmagent-image test demo bench generate check-generate lint tools clean

all: build

build:
	$(GO) build -trimpath -tags $(TAGS) -ldflags "-s -w -X github.com/meshfed/meshfed/cli.Version=$(VERSION)" -o $(BIN) ./cmd/meshfed
	$(GO) build -trimpath -tags $(TAGS) -ldflags "-s -w" -o $(BIN)-proxy ./cmd/meshfed-proxy
	$(GO) build -trimpath -tags $(TAGS) -ldflags "-s -w" -o $(BIN)-vmagent ./cmd/meshfed-vmagent
	$(GO) build -trimpath -tags $(TAGS) -ldflags "-s -w" -o bin/proxyless-grpc ./examples/proxyless-grpc

# image builds meshfed:$(VERSION) FROM scratch around the static binary.
image: build
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cp $(BIN) $(BIN)-proxy deploy/docker/Dockerfile $$tmp/ && \
		docker build -q -t meshfed:$(VERSION) $$tmp

# vmagent-image builds meshfed-vmagent:$(VERSION), the host agent FROM
# scratch (deploy/vm/Dockerfile says how to run it).
vmagent-image: build
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cp $(BIN)-vmagent deploy/vm/Dockerfile $$tmp/ && \
		docker build -q -t meshfed-vmagent:$(VERSION) $$tmp

# tools installs the real parts the tests run against (etcd from Debian).
tools:
	test/tools.sh

test: tools lint check-generate
	$(GO) test -count=1 -timeout 20m ./...
	# The unit tests again under the race detector (which needs cgo). The
	# e2e tests are left out: they time real failovers, and race builds of
	# the binaries run too slowly for those targets.
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 10m $$($(GO) list ./... | grep -v -e /test/e2e -e /bench/)
	# A short fuzzing run of the gateway's ClientHello parser, on top of
	# its committed seed corpus (go test above replays that corpus); short
	# minimizing keeps the time for new inputs.
	$(GO) test -run '^$$' -fuzz FuzzRead -fuzztime 15s -fuzzminimizetime 2s ./dataplane/sni

demo: build
	deploy/demo/demo.sh

bench: build tools
	$(GO) run ./bench/hub -meshfed $(BIN)
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 40m ./bench/kube ./bench/proxy ./bench/gateway ./bench/vmagent ./bench/consul

# generate rebuilds the committed protobuf code; protoc comes from Debian
# (protobuf-compiler 3.21.12), the plugins from go.mod's tool lines, so the
# output is byte-for-byte the committed one.
generate:
	@command -v protoc >/dev/null || { echo "protoc missing: apt-get install protobuf-compiler"; exit 1; }
	protoc -I api \
		--plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--plugin=protoc-gen-go-grpc="$$($(GO) tool -n protoc-gen-go-grpc)" \
		--go_out=$(GEN_OUT) --go_opt=paths=source_relative \
		--go-grpc_out=$(GEN_OUT) --go-grpc_opt=paths=source_relative \
		$(PROTOS)

# check-generate fails when the committed protobuf code is not what
# `make generate` makes.
check-generate: tools
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
		$(MAKE) -s generate GEN_OUT=$$tmp >/dev/null && \
		for f in api/meshfed/*/*.pb.go; do cmp -s $$f $$tmp/$${f#api/} || { echo "$$f differs from make generate's output: run make generate and commit"; exit 1; }; done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin
