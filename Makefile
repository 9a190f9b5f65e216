# podkeeper — see README.md. Everything the tests need is installed by `make peers`.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/podkeeper/podkeeper/agents/lifecycle.Version=$(VERSION)
export CGO_ENABLED := 0
export GOFLAGS := -buildvcs=false
AGENTS := $(notdir $(patsubst %/,%,$(dir $(wildcard cmd/*/main.go))))
TEST_TIMEOUT ?= 20m
FUZZTIME ?= 20s

.PHONY: all build test unit lint peers peers-all sizes fuzz bench demo image k8s-check e2e docs clean

all: build

build: ## the agents that exist and the injector, into bin/
	@mkdir -p bin
	@for a in $(AGENTS); do \
		$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/$$a ./cmd/$$a || exit 1; \
		echo "built bin/$$a"; \
	done

peers: ## install the real test peers (versitygw, MinIO, OTel fluent_forward receiver, FluentServer)
	test/peers/install.sh test

peers-all: ## peers plus rclone (benchmarks)
	test/peers/install.sh all

test: peers lint ## unit + integration tests on the real peers (the README's test command)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) --no-print-directory fuzz

unit: ## only what needs no peer (fast inner loop)
	$(GO) test -count=1 -short ./...

fuzz: ## the snapshot decoder and pack index fuzz targets, for a short fixed time each
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./agents/snapshot/
	$(GO) test -run '^$$' -fuzz '^FuzzIndex$$' -fuzztime $(FUZZTIME) ./agents/pack/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags bench,e2e ./bench/... ./test/e2e/... # benchmarks and e2e compile even where they do not run

sizes: build ## stripped size of each binary, what agents/kube costs, image sizes (after make image)
	@for a in $(AGENTS); do \
		stat -c %s bin/$$a | awk -v a=$$a '{ printf "%-12s %6.2f MiB  (%d bytes)\n", a, $$1/1048576, $$1 }'; \
	done
	test/k8s/sizes.sh

bench: peers-all build ## benchmarks against rclone, the raw SDK, fluent-logger-golang (minutes)
	$(GO) test -count=1 -tags bench -run '^TestBench' -v -timeout 90m ./bench/...

demo: build ## syncer + logshipper (stdout) -> wipe -> restore round trip on a file:// store (no server needed)
	test/demo.sh

image: ## build Dockerfile.agents with buildah (all targets), see test/k8s/
	test/k8s/image.sh

k8s-check: ## render + server-side dry-run every overlay on a real kube-apiserver, RBAC and agents/kube tests
	test/k8s/check.sh

e2e: ## full Pod life cycle on a real kubelet (see test/cluster/)
	test/e2e/run.sh

docs: ## rewrite the configuration tables in docs/*.md from the config structs
	$(GO) run ./test/docs/gen

clean:
	rm -rf bin
