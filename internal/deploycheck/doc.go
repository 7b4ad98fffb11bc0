// Package deploycheck holds the tests of the deployment files at the
// repository root: Dockerfile and .dockerignore, docker-compose.yml with its
// HAProxy, Prometheus and Grafana files under deploy/, deploy/fly/fly.toml
// and deploy/railway/. They check the files against the broker they deploy
// (every environment variable is one the broker reads and loads; every
// port, path, service and file they name exists; every metric a dashboard
// or an alert uses is registered), run the image's commands on a binary
// built by the Dockerfile's own build command from the context
// .dockerignore leaves, and run HAProxy, promtool and the broker for real.
//
// No Docker engine, Fly.io or Railway account is used: what those
// platforms do with the files is not verified here.
package deploycheck
