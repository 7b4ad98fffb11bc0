# syntax=docker/dockerfile:1

# The claudemesh broker image: one static binary on distroless, running as
# an unprivileged user, with no shell (so the health check is the broker
# itself). Build from the repository root:
#
#   docker build --build-arg GIT_SHA=$(git rev-parse --short HEAD) -t claudemesh-broker .
#
# GO_VERSION follows the go line of go.mod (a test checks it).
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/broker ./cmd/broker

FROM gcr.io/distroless/static-debian12:nonroot
# Reported by GET /health as gitSha.
ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA}
COPY --from=build /out/broker /usr/local/bin/broker
USER nonroot:nonroot
# 7900: HTTP and WebSocket (BROKER_PORT). 7946: gossip, TCP and UDP (CLUSTER_BIND).
EXPOSE 7900/tcp 7946/tcp 7946/udp
# `broker healthcheck` GETs http://127.0.0.1:$BROKER_PORT/health: 0 on 200, else 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/broker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/broker"]
CMD ["serve"]
