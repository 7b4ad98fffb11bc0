.PHONY: run test test-long race build

# A local 3-node cluster on a private Postgres (needs the PostgreSQL server binaries).
run:
	go run ./cmd/broker dev

# The whole test suite (what CI runs). As root it installs the tools a few
# tests run (chromium, haproxy, promtool) without leaving their services
# enabled; otherwise it says what to install and skips only those tests.
test:
	./scripts/test.sh

# The fault scenarios at long load (30 peers x 1,000 msg/s each); CI runs them after `test`.
test-long:
	go test -tags long -count=1 -timeout 60m ./internal/clustertest/

# The suite under the race detector.
race:
	./scripts/test.sh -race

build:
	CGO_ENABLED=0 go build -trimpath -o bin/broker ./cmd/broker
	CGO_ENABLED=0 go build -trimpath -o bin/claudemesh ./cmd/claudemesh
	CGO_ENABLED=0 go build -trimpath -o bin/meshbench ./cmd/meshbench
