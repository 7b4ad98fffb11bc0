.PHONY: run test race fuzz build bench

# A local 3-node cluster on a private Postgres (needs the PostgreSQL server binaries).
run:
	go run ./cmd/broker dev

# The whole test suite (what CI runs).
test:
	./scripts/test.sh

# The suite under the race detector.
race:
	./scripts/test.sh -race

build:
	CGO_ENABLED=0 go build -trimpath -o bin/broker ./cmd/broker
	CGO_ENABLED=0 go build -trimpath -o bin/claudemesh ./cmd/claudemesh
	CGO_ENABLED=0 go build -trimpath -o bin/meshbench ./cmd/meshbench
