package deploycheck_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// testSh runs scripts/test.sh with every program it calls stubbed: id (as
// uid), apt-get (records its arguments, asks policy-rc.d whether haproxy
// may start, and "installs" the tools), systemctl, update-rc.d and go. The
// system paths it touches live under a scratch root.
type testSh struct {
	t      *testing.T
	root   string // TEST_SH_SYSROOT
	bin    string // the whole PATH
	log    string
	uid    string
	ci     string
	booted bool // systemd runs
}

func newTestSh(t *testing.T, uid string) *testSh {
	t.Helper()
	s := &testSh{t: t, root: t.TempDir(), bin: t.TempDir(), uid: uid}
	s.log = filepath.Join(s.root, "calls.log")
	for _, d := range []string{"usr/sbin", "etc/init.d"} {
		if err := os.MkdirAll(filepath.Join(s.root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The few real programs the script needs besides the stubs.
	for _, prog := range []string{"dirname", "chmod", "rm", "cat"} {
		p, err := exec.LookPath(prog)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(s.bin, prog)); err != nil {
			t.Fatal(err)
		}
	}
	s.stub("id", `[ "$1" = -u ] && echo "$STUB_UID"`)
	s.stub("go", `echo "go $*" >>"$STUB_LOG"`)
	s.stub("systemctl", `echo "systemctl $*" >>"$STUB_LOG"
case "$1" in is-enabled|is-active) exit 1 ;; esac`)
	s.stub("update-rc.d", `echo "update-rc.d $*" >>"$STUB_LOG"`)
	s.stub("apt-get", `echo "apt-get $*" >>"$STUB_LOG"
[ "$1" = install ] || exit 0
policy="$TEST_SH_SYSROOT/usr/sbin/policy-rc.d"
if [ -x "$policy" ]; then "$policy" haproxy start; echo "policy-rc.d says $?" >>"$STUB_LOG"; else echo "no policy-rc.d" >>"$STUB_LOG"; fi
for p in "$@"; do
  case $p in
    chromium) t=chromium ;; haproxy) t=haproxy ;; prometheus) t=promtool ;; *) continue ;;
  esac
  printf '#!/bin/sh\n' >"$STUB_BIN/$t"; chmod 755 "$STUB_BIN/$t"
done`)
	return s
}

func (s *testSh) stub(name, body string) {
	s.t.Helper()
	if err := os.WriteFile(filepath.Join(s.bin, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		s.t.Fatal(err)
	}
}

func (s *testSh) run() (code int, stderr string, calls []string) {
	s.t.Helper()
	if s.booted {
		if err := os.MkdirAll(filepath.Join(s.root, "run/systemd/system"), 0o755); err != nil {
			s.t.Fatal(err)
		}
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		s.t.Fatal(err)
	}
	code, _, stderr = run(s.t, []string{bash, repoPath("scripts/test.sh"), "-short"}, []string{
		"PATH=" + s.bin, "TEST_SH_SYSROOT=" + s.root, "STUB_LOG=" + s.log, "STUB_BIN=" + s.bin, "STUB_UID=" + s.uid, "CI=" + s.ci,
	})
	s.t.Logf("test.sh stderr:\n%s", stderr)
	data, _ := os.ReadFile(s.log)
	return code, stderr, strings.Split(strings.TrimSpace(string(data)), "\n")
}

func has(lines []string, want string) bool {
	for _, l := range lines {
		if l == want {
			return true
		}
	}
	return false
}

// As root on a systemd host, `make test` installs the missing tools while a
// policy-rc.d forbids starting services, removes that policy-rc.d after,
// and leaves haproxy.service and prometheus.service disabled and stopped.
// Then it runs vet and the tests.
func TestTestShAsRootLeavesNoServices(t *testing.T) {
	s := newTestSh(t, "0")
	s.booted = true
	code, stderr, calls := s.run()
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%v", code, stderr, calls)
	}
	for _, want := range []string{
		"apt-get install -y -qq --no-install-recommends chromium haproxy prometheus",
		"policy-rc.d says 101",
		"systemctl disable --now haproxy.service",
		"systemctl disable --now prometheus.service",
		"go vet ./...",
		"go test -timeout 30m -count=1 -short ./...",
	} {
		if !has(calls, want) {
			t.Errorf("no %q among the calls:\n%s", want, strings.Join(calls, "\n"))
		}
	}
	if _, err := os.Stat(filepath.Join(s.root, "usr/sbin/policy-rc.d")); !os.IsNotExist(err) {
		t.Errorf("the temporary policy-rc.d was left behind: %v", err)
	}
	if !strings.Contains(stderr, "haproxy: installed for its program only") || strings.Contains(stderr, "SKIPPED") {
		t.Errorf("stderr:\n%s", stderr)
	}
}

// In a container (systemctl present, systemd not running, sysvinit scripts,
// Docker's own policy-rc.d) the unit links are removed offline and the
// sysvinit links disabled; the existing policy-rc.d stays. A tool that was
// already installed is left alone: only what the script installed is
// touched.
func TestTestShInContainer(t *testing.T) {
	s := newTestSh(t, "0")
	docker := "#!/bin/sh\nexit 101\n"
	if err := os.WriteFile(filepath.Join(s.root, "usr/sbin/policy-rc.d"), []byte(docker), 0o755); err != nil {
		t.Fatal(err)
	}
	s.stub("haproxy", "") // installed before
	for _, svc := range []string{"haproxy", "prometheus"} {
		script := "#!/bin/sh\necho \"init.d " + svc + " $1\" >>\"$STUB_LOG\"\n[ \"$1\" = status ] && exit 3\n"
		if err := os.WriteFile(filepath.Join(s.root, "etc/init.d", svc), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	code, stderr, calls := s.run()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	for _, want := range []string{
		"apt-get install -y -qq --no-install-recommends chromium prometheus",
		"policy-rc.d says 101",
		"systemctl disable prometheus.service",
		"update-rc.d prometheus disable",
		"init.d prometheus status",
	} {
		if !has(calls, want) {
			t.Errorf("no %q among the calls:\n%s", want, strings.Join(calls, "\n"))
		}
	}
	for _, never := range []string{"systemctl disable haproxy.service", "update-rc.d haproxy disable", "init.d prometheus stop"} {
		if has(calls, never) {
			t.Errorf("unexpected %q:\n%s", never, strings.Join(calls, "\n"))
		}
	}
	if b, err := os.ReadFile(filepath.Join(s.root, "usr/sbin/policy-rc.d")); err != nil || string(b) != docker {
		t.Errorf("the image's policy-rc.d was changed: %q %v", b, err)
	}
}

// Not root and without the tools: the script says exactly what to install
// and still runs every test (those needing the tools skip themselves,
// outside CI); in CI it says they fail.
func TestTestShWithoutRoot(t *testing.T) {
	s := newTestSh(t, "1000")
	code, stderr, calls := s.run()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	if !has(calls, "go test -timeout 30m -count=1 -short ./...") {
		t.Errorf("the tests did not run: %v", calls)
	}
	for _, c := range calls {
		if strings.HasPrefix(c, "apt-get") || strings.HasPrefix(c, "systemctl") {
			t.Errorf("a non-root run called %q", c)
		}
	}
	for _, want := range []string{"sudo apt-get install chromium haproxy prometheus", "SKIPPED", "reminder:"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}

	s.ci = "true"
	_, stderr, _ = s.run()
	if !strings.Contains(stderr, "in CI (CI=true) the tests that need them FAIL") || strings.Contains(stderr, "SKIPPED") {
		t.Errorf("in CI, stderr:\n%s", stderr)
	}
}
