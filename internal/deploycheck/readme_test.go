package deploycheck_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/config"
)

// Every environment variable the broker reads is named in the README's
// configuration table, so a new one cannot ship undocumented.
func TestReadmeConfigurationTable(t *testing.T) {
	readme := string(readRepoFile(t, "README.md"))
	start := strings.Index(readme, "\n## Configuration\n")
	if start < 0 {
		t.Fatal("README.md has no ## Configuration section")
	}
	section := readme[start+1:]
	if end := strings.Index(section[3:], "\n## "); end >= 0 {
		section = section[:end+3]
	}
	var rows strings.Builder
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "|") {
			rows.WriteString(line + "\n")
		}
	}
	for _, v := range config.Variables() {
		if !regexp.MustCompile(`\b` + regexp.QuoteMeta(v) + `\b`).MatchString(rows.String()) {
			t.Errorf("README.md's configuration table does not name %s", v)
		}
	}
}
