package deploycheck_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/claudemesh/broker/internal/metrics"
)

// series is what the broker exports: each series name with its label
// names, and the values pre-created for each label.
type series struct {
	labels map[string]map[string]bool            // series → label names
	values map[string]map[string]map[string]bool // series → label → values seen
}

// recordingRegisterer remembers what metrics.New registers.
type recordingRegisterer struct {
	*prometheus.Registry
	collectors []prometheus.Collector
}

func (r *recordingRegisterer) Register(c prometheus.Collector) error {
	r.collectors = append(r.collectors, c)
	return r.Registry.Register(c)
}

func (r *recordingRegisterer) MustRegister(cs ...prometheus.Collector) {
	r.collectors = append(r.collectors, cs...)
	r.Registry.MustRegister(cs...)
}

// descRE reads a collector's description (prometheus.Desc.String), which
// also names the labels of a vector that has no series yet.
var descRE = regexp.MustCompile(`^Desc\{fqName: "([^"]+)", .*variableLabels: \{([^}]*)\}\}$`)

// brokerSeries lists what metrics.New exports: the names and labels of
// every registered collector, and the label values it creates up front. A
// histogram exports _bucket (with le), _sum and _count.
func brokerSeries(t *testing.T) series {
	t.Helper()
	rec := &recordingRegisterer{Registry: prometheus.NewRegistry()}
	metrics.New(rec)
	mfs, err := rec.Gather()
	if err != nil {
		t.Fatal(err)
	}
	types := map[string]dto.MetricType{}
	for _, mf := range mfs {
		types[mf.GetName()] = mf.GetType()
	}
	s := series{labels: map[string]map[string]bool{}, values: map[string]map[string]map[string]bool{}}
	add := func(name string, labels []string) {
		if s.labels[name] == nil {
			s.labels[name] = map[string]bool{}
			s.values[name] = map[string]map[string]bool{}
		}
		for _, l := range labels {
			s.labels[name][l] = true
		}
	}
	addFamily := func(name string, typ dto.MetricType, labels []string) {
		switch typ {
		case dto.MetricType_HISTOGRAM:
			add(name+"_bucket", append(slices.Clone(labels), "le"))
			add(name+"_sum", labels)
			add(name+"_count", labels)
		case dto.MetricType_SUMMARY:
			add(name, append(slices.Clone(labels), "quantile"))
			add(name+"_sum", labels)
			add(name+"_count", labels)
		default:
			add(name, labels)
		}
	}
	for _, c := range rec.collectors {
		ch := make(chan *prometheus.Desc)
		go func() {
			c.Describe(ch)
			close(ch)
		}()
		for d := range ch {
			m := descRE.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read %s", d)
			}
			var labels []string
			for _, l := range strings.Split(m[2], ",") {
				if l = strings.TrimSpace(l); l != "" {
					labels = append(labels, l)
				}
			}
			typ, ok := types[m[1]]
			if !ok {
				switch c.(type) {
				case *prometheus.HistogramVec:
					typ = dto.MetricType_HISTOGRAM
				case *prometheus.SummaryVec:
					typ = dto.MetricType_SUMMARY
				}
			}
			addFamily(m[1], typ, labels)
		}
	}
	for _, mf := range mfs {
		name := mf.GetName()
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			name += "_bucket"
		}
		for _, metric := range mf.GetMetric() {
			for _, lp := range metric.GetLabel() {
				if s.values[name][lp.GetName()] == nil {
					s.values[name][lp.GetName()] = map[string]bool{}
				}
				s.values[name][lp.GetName()][lp.GetValue()] = true
			}
		}
	}
	// Prometheus adds up{job, instance} for every target.
	add("up", nil)
	return s
}

// selector is one metric selector of a PromQL expression.
type selector struct {
	name     string
	matchers []matcher
}

type matcher struct{ label, op, value string }

var promKeywords = map[string]bool{
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "inf": true, "nan": true,
	// Aggregations, which may be followed by "by (...)" before their "(".
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
	"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
	"limitk": true, "limit_ratio": true,
}

var groupingKeywords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
}

// parsePromQL extracts the metric selectors of expr and the label names
// used for grouping and matching (by, without, on, ignoring,
// group_left/right). It is a scanner, not a parser: promtool checks the
// syntax.
func parsePromQL(expr string) (sels []selector, grouping []string, err error) {
	isIdent := func(c byte, first bool) bool {
		return c == '_' || c == ':' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (!first && c >= '0' && c <= '9')
	}
	skipSpace := func(i int) int {
		for i < len(expr) && (expr[i] == ' ' || expr[i] == '\t' || expr[i] == '\n') {
			i++
		}
		return i
	}
	closing := func(i int, open, close byte) (int, error) {
		depth := 0
		for j := i; j < len(expr); j++ {
			switch expr[j] {
			case '"', '\'', '`':
				q := expr[j]
				for j++; j < len(expr) && expr[j] != q; j++ {
					if expr[j] == '\\' {
						j++
					}
				}
			case open:
				depth++
			case close:
				depth--
				if depth == 0 {
					return j, nil
				}
			}
		}
		return 0, fmt.Errorf("unbalanced %c in %q", open, expr)
	}
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && expr[j] != c {
				if expr[j] == '\\' {
					j++
				}
				j++
			}
			i = j + 1
		case c == '[':
			j, err := closing(i, '[', ']')
			if err != nil {
				return nil, nil, err
			}
			i = j + 1
		case c == '{':
			// A selector without a name, e.g. {__name__=~"..."}: not used here.
			return nil, nil, fmt.Errorf("selector without a metric name in %q", expr)
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (isIdent(expr[i], false) || expr[i] == '.' || expr[i] == '+' && (expr[i-1] == 'e' || expr[i-1] == 'E')) {
				i++
			}
		case isIdent(c, true):
			j := i
			for j < len(expr) && isIdent(expr[j], false) {
				j++
			}
			word := expr[i:j]
			k := skipSpace(j)
			switch {
			case groupingKeywords[strings.ToLower(word)]:
				if k < len(expr) && expr[k] == '(' {
					end, err := closing(k, '(', ')')
					if err != nil {
						return nil, nil, err
					}
					for _, l := range strings.Split(expr[k+1:end], ",") {
						if l = strings.TrimSpace(l); l != "" {
							grouping = append(grouping, l)
						}
					}
					k = end + 1
				}
				i = k
			case promKeywords[strings.ToLower(word)]:
				i = j
			case k < len(expr) && expr[k] == '(':
				i = j // a function or an aggregation
			default:
				sel := selector{name: word}
				if k < len(expr) && expr[k] == '{' {
					end, err := closing(k, '{', '}')
					if err != nil {
						return nil, nil, err
					}
					for _, m := range matcherRE.FindAllStringSubmatch(expr[k+1:end], -1) {
						sel.matchers = append(sel.matchers, matcher{label: m[1], op: m[2], value: m[3]})
					}
					k = end + 1
				} else {
					k = j
				}
				sels = append(sels, sel)
				i = k
			}
		default:
			i++
		}
	}
	return sels, grouping, nil
}

var matcherRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)

// exprProblems lists the metric names, labels and label values of expr
// that the broker does not export.
func exprProblems(expr string, s series) []string {
	sels, grouping, err := parsePromQL(expr)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	if len(sels) == 0 {
		problems = append(problems, fmt.Sprintf("%q uses no metric", expr))
	}
	usable := map[string]bool{"job": true, "instance": true} // added by the scrape
	for _, sel := range sels {
		labels, ok := s.labels[sel.name]
		if !ok {
			problems = append(problems, sel.name+" is not a metric the broker exports (internal/metrics)")
			continue
		}
		for l := range labels {
			usable[l] = true
		}
		for _, m := range sel.matchers {
			if !labels[m.label] && m.label != "job" && m.label != "instance" {
				problems = append(problems, fmt.Sprintf("%s has no label %s", sel.name, m.label))
				continue
			}
			if vals := s.values[sel.name][m.label]; m.op == "=" && len(vals) > 0 && !vals[m.value] {
				problems = append(problems, fmt.Sprintf("%s{%s=%q}: the broker exports %s only as %v", sel.name, m.label, m.value, m.label, keys(vals)))
			}
		}
	}
	for _, l := range grouping {
		if !usable[l] {
			problems = append(problems, "groups by "+l+", a label none of its metrics has")
		}
	}
	return problems
}

func checkExpr(t *testing.T, where, expr string, s series) {
	t.Helper()
	for _, p := range exprProblems(expr, s) {
		t.Errorf("%s: %s", where, p)
	}
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// dashboardQueries returns every PromQL query of the dashboard, with
// Grafana's variables made concrete, keyed by where it is.
func dashboardQueries(t *testing.T) (queries map[string]string, variables map[string]string) {
	t.Helper()
	var dash struct {
		Panels []struct {
			Title   string
			Type    string
			Targets []struct{ Expr string }
		}
		Templating struct {
			List []struct {
				Name  string
				Query struct{ Query string }
			}
		}
	}
	if err := json.Unmarshal(readRepoFile(t, "deploy/grafana/dashboards/claudemesh.json"), &dash); err != nil {
		t.Fatal(err)
	}
	grafanaVars := strings.NewReplacer("$__rate_interval", "1m", "$__interval", "1m", "$instance", ".*")
	queries, variables = map[string]string{}, map[string]string{}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("dashboard panel %q has no query", p.Title)
		}
		for i, tg := range p.Targets {
			queries[fmt.Sprintf("panel %q query %d", p.Title, i)] = grafanaVars.Replace(tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		variables["variable "+v.Name] = v.Query.Query
	}
	return queries, variables
}

type alertRules struct {
	Groups []struct {
		Name  string
		Rules []struct {
			Alert, Expr string
		}
	}
}

var labelValues = regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)

// Every metric, label and label value the Grafana dashboard and the
// Prometheus alerts use is one the broker exports, and promtool accepts
// the Prometheus config, the alert rules, the dashboard's queries and the
// alerts' unit tests (deploy/prometheus/alerts_test.yml).
func TestDashboardAndAlertsUseBrokerMetrics(t *testing.T) {
	s := brokerSeries(t)
	queries, variables := dashboardQueries(t)
	if len(queries) < 10 {
		t.Fatalf("the dashboard has only %d queries", len(queries))
	}
	for where, q := range queries {
		checkExpr(t, "dashboard "+where, q, s)
	}
	for where, q := range variables {
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("dashboard %s: %q is not label_values(selector, label)", where, q)
			continue
		}
		checkExpr(t, "dashboard "+where, m[1], s)
		if sels, _, _ := parsePromQL(m[1]); len(sels) == 1 && !s.labels[sels[0].name][m[2]] && m[2] != "instance" && m[2] != "job" {
			t.Errorf("dashboard %s: %s has no label %s", where, sels[0].name, m[2])
		}
	}

	var rules alertRules
	if err := yaml.Unmarshal(readRepoFile(t, "deploy/prometheus/alerts.yml"), &rules); err != nil {
		t.Fatal(err)
	}
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			checkExpr(t, "alert "+r.Alert, r.Expr, s)
			alerts[r.Alert] = true
		}
	}
	// The alerts the deployment promises (see the README).
	for _, want := range []string{"ClaudemeshNodeDown", "ClaudemeshPostgresDown", "ClaudemeshClusterSizeBelowExpected",
		"ClaudemeshQueueDepthHigh", "ClaudemeshCapacityRejections", "ClaudemeshRelayLagHigh", "ClaudemeshSlowConsumers"} {
		if !alerts[want] {
			t.Errorf("alerts.yml has no %s", want)
		}
	}

	promtool := tool(t, "promtool", "prometheus")
	if code, out, errOut := run(t, []string{promtool, "check", "config", repoPath("deploy/prometheus/prometheus.yml")}, nil); code != 0 {
		t.Errorf("promtool check config:\n%s%s", out, errOut)
	}
	// promtool resolves the rule files of the tests relative to the file.
	if code, out, errOut := run(t, []string{promtool, "test", "rules", repoPath("deploy/prometheus/alerts_test.yml")}, nil); code != 0 {
		t.Errorf("promtool test rules (the alerts' unit tests):\n%s%s", out, errOut)
	}
	// The dashboard's queries, as recording rules, so that promtool
	// parses them.
	type rule struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var recs []rule
	for i, where := range sortedKeys(queries) {
		recs = append(recs, rule{Record: fmt.Sprintf("dashboard:query_%d", i), Expr: queries[where]})
	}
	data, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": recs}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboard_rules.yml")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := run(t, []string{promtool, "check", "rules", path}, nil); code != 0 {
		t.Errorf("promtool rejects dashboard queries:\n%s%s\n%s", out, errOut, data)
	}
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// The scanner finds what a dashboard or an alert could get wrong.
func TestParsePromQL(t *testing.T) {
	sels, grouping, err := parsePromQL(`histogram_quantile(0.99, sum by (le, instance) (rate(broker_relay_lag_seconds_bucket{instance=~".*", le!="+Inf"}[5m]))) > 1e3 and on(job) up{job="claudemesh"} offset 5m`)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range sels {
		names = append(names, s.name)
	}
	if !slices.Equal(names, []string{"broker_relay_lag_seconds_bucket", "up"}) || !slices.Equal(grouping, []string{"le", "instance", "job"}) {
		t.Fatalf("selectors %v, grouping %v", names, grouping)
	}
	if m := sels[0].matchers; len(m) != 2 || m[1] != (matcher{"le", "!=", "+Inf"}) {
		t.Fatalf("matchers %v", m)
	}
	s := brokerSeries(t)
	for _, bad := range []string{
		`rate(broker_nonexistent_total[5m])`,
		`broker_connections_rejected_total{reason="capacty"}`,
		`sum by (region) (broker_connections_active)`,
		`broker_queue_depth{reason="x"}`,
		`broker_commit_to_push_seconds`, // a histogram has no bare series
	} {
		if p := exprProblems(bad, s); len(p) == 0 {
			t.Errorf("%q passed the metric check", bad)
		}
	}
	for _, good := range []string{
		`sum by (reason) (rate(broker_delivery_claims_total{reason="local"}[5m]))`, // a vector without series yet
		`broker_connections_rejected_total{reason="capacity", instance=~".+"}`,
		`histogram_quantile(0.5, sum by (le) (rate(broker_send_commit_seconds_bucket[1m])))`,
	} {
		if p := exprProblems(good, s); len(p) != 0 {
			t.Errorf("%q: %v", good, p)
		}
	}
}
