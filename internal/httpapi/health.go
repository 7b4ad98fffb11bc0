package httpapi

import (
	"net/http"
	"time"
)

// Health is the body of GET /health.
type Health struct {
	Status      string  `json:"status"`
	DB          string  `json:"db"`
	Version     string  `json:"version"`
	GitSHA      string  `json:"gitSha"`
	Uptime      float64 `json:"uptime"`
	Node        string  `json:"node"`
	ClusterSize int     `json:"clusterSize"`
	Sessions    int     `json:"sessions"`
}

func (a *API) serveHealth(w http.ResponseWriter, _ *http.Request) {
	h := a.selfHealth()
	status := http.StatusOK
	if h.Status != "ok" {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
}

// selfHealth is what this node's GET /health reports.
func (a *API) selfHealth() Health {
	h := Health{Status: "ok", DB: "up", Version: Version, GitSHA: a.cfg.GitSHA,
		Uptime: time.Since(a.node.Started()).Round(time.Millisecond).Seconds(), Node: a.node.Name(),
		ClusterSize: a.cluster.NumMembers(), Sessions: a.node.Sessions()}
	if h.GitSHA == "" {
		h.GitSHA = "unknown"
	}
	if !a.node.DBHealthy() {
		h.Status, h.DB = "degraded", "down"
	}
	return h
}
