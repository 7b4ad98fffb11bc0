package deploycheck_test

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case
	args string
}

type stage struct {
	from, name string
	ins        []instruction
}

// dockerfile is the parts of the Dockerfile the checks use.
type dockerfile struct {
	globalArgs map[string]string // ARGs before the first FROM
	stages     []stage
}

func parseDockerfile(t *testing.T) dockerfile {
	t.Helper()
	df := dockerfile{globalArgs: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(readRepoFile(t, "Dockerfile")))
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		cmd, args, _ := strings.Cut(line, " ")
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)}
		switch {
		case in.cmd == "FROM":
			from, name, _ := strings.Cut(in.args, " AS ")
			df.stages = append(df.stages, stage{from: strings.TrimSpace(from), name: strings.TrimSpace(name)})
		case len(df.stages) == 0 && in.cmd == "ARG":
			k, v, _ := strings.Cut(in.args, "=")
			df.globalArgs[k] = v
		case len(df.stages) == 0:
			t.Fatalf("Dockerfile: %s before the first FROM", in.cmd)
		default:
			s := &df.stages[len(df.stages)-1]
			s.ins = append(s.ins, in)
		}
	}
	for sc.Scan() {
		line := sc.Text()
		if trimmed := strings.TrimSpace(line); cur.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "#")) {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cur.WriteString(line)
		flush()
	}
	flush()
	if len(df.stages) == 0 {
		t.Fatal("Dockerfile has no FROM")
	}
	return df
}

// final is the stage that makes the image.
func (df dockerfile) final() stage { return df.stages[len(df.stages)-1] }

// all returns the args of every instruction cmd of stage s.
func (s stage) all(cmd string) []string {
	var out []string
	for _, in := range s.ins {
		if in.cmd == cmd {
			out = append(out, in.args)
		}
	}
	return out
}

// one returns the args of the only instruction cmd of stage s.
func (s stage) one(t *testing.T, cmd string) string {
	t.Helper()
	all := s.all(cmd)
	if len(all) != 1 {
		t.Fatalf("Dockerfile: the final stage has %d %s instructions, want 1", len(all), cmd)
	}
	return all[0]
}

// execForm decodes a JSON exec-form command: a shell form would need a
// shell, and the runtime image has none.
func execForm(t *testing.T, what, args string) []string {
	t.Helper()
	var argv []string
	if err := json.Unmarshal([]byte(args), &argv); err != nil || len(argv) == 0 {
		t.Fatalf("Dockerfile: %s %s is not in exec form (a JSON array): the image has no shell", what, args)
	}
	return argv
}

// image is how the Dockerfile runs the broker.
type image struct {
	binary      string   // where the binary is copied to
	entrypoint  []string // ENTRYPOINT
	cmd         []string // CMD
	healthcheck []string // HEALTHCHECK CMD
	env         map[string]string
	buildCmd    string // the shell command of the RUN that builds the binary
	buildOutput string // its -o
}

var goBuildOutput = regexp.MustCompile(`-o\s+(\S+)`)

// parseImage reads the image's commands and checks what does not need a
// build: a multi-stage build on the go.mod Go version, a static binary on a
// distroless or scratch base, a non-root user, exec-form commands, the
// health check, GIT_SHA and the exposed ports.
func parseImage(t *testing.T) image {
	t.Helper()
	df := parseDockerfile(t)
	if len(df.stages) < 2 {
		t.Fatalf("Dockerfile has %d stage(s), want a multi-stage build", len(df.stages))
	}
	var img image
	for _, s := range df.stages[:len(df.stages)-1] {
		for _, run := range s.all("RUN") {
			if strings.Contains(run, "go build") {
				img.buildCmd = run
			}
		}
	}
	if img.buildCmd == "" {
		t.Fatal("Dockerfile: no build stage runs go build")
	}
	if !strings.Contains(img.buildCmd, "CGO_ENABLED=0") {
		t.Errorf("Dockerfile: %q does not build a static binary (CGO_ENABLED=0)", img.buildCmd)
	}
	m := goBuildOutput.FindStringSubmatch(img.buildCmd)
	if m == nil {
		t.Fatalf("Dockerfile: %q has no -o", img.buildCmd)
	}
	img.buildOutput = m[1]

	goMod := string(readRepoFile(t, "go.mod"))
	goLine := regexp.MustCompile(`(?m)^go (\S+)$`).FindStringSubmatch(goMod)
	if goLine == nil || df.globalArgs["GO_VERSION"] != goLine[1] || !strings.Contains(df.stages[0].from, "${GO_VERSION}") {
		t.Errorf("Dockerfile: the build stage (FROM %s, GO_VERSION=%s) must use go.mod's Go version %v", df.stages[0].from, df.globalArgs["GO_VERSION"], goLine)
	}

	final := df.final()
	if !strings.Contains(final.from, "distroless/static") && final.from != "scratch" {
		t.Errorf("Dockerfile: the runtime image is %s, want a static distroless or scratch base", final.from)
	}
	if user := strings.TrimSpace(final.one(t, "USER")); user == "" || strings.HasPrefix(user, "root") || strings.HasPrefix(user, "0") {
		t.Errorf("Dockerfile: USER %q runs as root", user)
	}
	for _, cp := range final.all("COPY") {
		f := strings.Fields(cp)
		if len(f) == 3 && strings.HasPrefix(f[0], "--from=") && f[1] == img.buildOutput {
			img.binary = f[2]
		}
	}
	if img.binary == "" {
		t.Fatalf("Dockerfile: the final stage does not COPY the built %s", img.buildOutput)
	}
	img.entrypoint = execForm(t, "ENTRYPOINT", final.one(t, "ENTRYPOINT"))
	img.cmd = execForm(t, "CMD", final.one(t, "CMD"))
	if img.entrypoint[0] != img.binary || !slices.Equal(img.cmd, []string{"serve"}) {
		t.Errorf("Dockerfile: ENTRYPOINT %v CMD %v, want the broker binary and serve", img.entrypoint, img.cmd)
	}
	hc := final.one(t, "HEALTHCHECK")
	opts, cmd, ok := strings.Cut(hc, "CMD ")
	if !ok {
		t.Fatalf("Dockerfile: HEALTHCHECK %q has no CMD", hc)
	}
	img.healthcheck = execForm(t, "HEALTHCHECK CMD", strings.TrimSpace(cmd))
	if img.healthcheck[0] != img.binary || !slices.Contains(img.healthcheck, "healthcheck") {
		t.Errorf("Dockerfile: HEALTHCHECK CMD %v does not run `broker healthcheck`", img.healthcheck)
	}
	for _, o := range []string{"--interval=", "--timeout=", "--start-period="} {
		if !strings.Contains(opts, o) {
			t.Errorf("Dockerfile: HEALTHCHECK sets no %s", o)
		}
	}

	args := map[string]string{}
	for _, a := range final.all("ARG") {
		k, v, _ := strings.Cut(a, "=")
		args[k] = v
	}
	img.env = map[string]string{}
	for _, e := range final.all("ENV") {
		k, v, ok := strings.Cut(e, "=")
		if !ok {
			t.Fatalf("Dockerfile: ENV %q: use ENV KEY=value", e)
		}
		if !slices.Contains(config.Variables(), k) {
			t.Errorf("Dockerfile: ENV %s is not a variable the broker reads", k)
		}
		img.env[k] = v
	}
	if _, ok := args["GIT_SHA"]; !ok || img.env["GIT_SHA"] != "${GIT_SHA}" {
		t.Errorf("Dockerfile: the final stage must turn the GIT_SHA build argument into ENV GIT_SHA=${GIT_SHA} (got ARG %v, ENV %q)", ok, img.env["GIT_SHA"])
	}

	def, err := config.LoadFrom([]string{})
	if err != nil {
		t.Fatal(err)
	}
	exposed := strings.Fields(strings.Join(final.all("EXPOSE"), " "))
	gossip := strconv.Itoa(port(t, def.ClusterBind))
	for _, want := range []string{strconv.Itoa(def.Port) + "/tcp", gossip + "/tcp", gossip + "/udp"} {
		if !slices.Contains(exposed, want) && !slices.Contains(exposed, strings.TrimSuffix(want, "/tcp")) {
			t.Errorf("Dockerfile: EXPOSE %v lacks %s", exposed, want)
		}
	}
	return img
}

func TestDockerfile(t *testing.T) { parseImage(t) }

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
	buildDir  string
)

// brokerBinary builds the broker once per test binary the way the image
// does: the Dockerfile's own go build command, run in a copy of the build
// context that .dockerignore leaves.
func brokerBinary(t *testing.T, img image) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "deploycheck-build-")
		if buildErr != nil {
			return
		}
		builtBin, buildErr = buildLikeDocker(img, buildDir)
	})
	if buildErr != nil {
		t.Fatalf("build the broker as the Dockerfile does: %v", buildErr)
	}
	return builtBin
}

func buildLikeDocker(img image, dir string) (string, error) {
	ctxDir := filepath.Join(dir, "src")
	if err := copyBuildContext(ctxDir); err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "out", "broker")
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return "", err
	}
	// Drop RUN's --mount flags (BuildKit caches) and write to the test's
	// folder instead of the image's /out.
	var words []string
	for _, w := range strings.Fields(img.buildCmd) {
		if !strings.HasPrefix(w, "--mount=") {
			words = append(words, w)
		}
	}
	cmdline := strings.Replace(strings.Join(words, " "), img.buildOutput, bin, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", cmdline)
	cmd.Dir = ctxDir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", errors.New(cmdline + ": " + err.Error() + "\n" + out.String())
	}
	return bin, nil
}

// copyBuildContext copies the repository into dst leaving out what
// .dockerignore excludes, with Docker's own matcher.
func copyBuildContext(dst string) error {
	f, err := os.Open(repoPath(".dockerignore"))
	if err != nil {
		return err
	}
	patterns, err := ignorefile.ReadAll(f)
	f.Close()
	if err != nil {
		return err
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return err
	}
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		excluded, err := pm.MatchesOrParentMatches(filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		if excluded {
			if d.IsDir() && !pm.Exclusions() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			return copyFile(path, target)
		}
		return nil // sockets, symlinks: nothing the build needs
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// run runs argv with env (and nothing else, as in a container) and returns
// its exit code and output.
func run(t *testing.T, argv []string, env []string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append([]string{}, env...) // never the test's own environment
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout.String(), stderr.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), stdout.String(), stderr.String()
	}
	t.Fatalf("%v: %v", argv, err)
	return -1, "", ""
}

// inImage maps a command of the image onto the locally built binary.
func inImage(img image, bin string, argv []string) []string {
	out := slices.Clone(argv)
	for i, a := range out {
		if a == img.binary {
			out[i] = bin
		}
	}
	return out
}

// The binary the Dockerfile builds, from the context .dockerignore leaves,
// is static; the image's ENTRYPOINT and CMD serve, its HEALTHCHECK command
// passes against the running node and fails once it stopped, and the GIT_SHA
// build argument reaches /health through the image's ENV.
func TestImageCommands(t *testing.T) {
	img := parseImage(t)
	bin := brokerBinary(t, img)

	ef, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	libs, _ := ef.ImportedLibraries()
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			libs = append(libs, "program interpreter")
		}
	}
	ef.Close()
	if len(libs) > 0 {
		t.Fatalf("the image's binary is not static: it needs %v", libs)
	}

	const sha = "0123abc-deploycheck"
	httpPort := freePort(t)
	env := []string{"HOME=/nonexistent"}
	for k, v := range img.env {
		env = append(env, k+"="+strings.ReplaceAll(v, "${GIT_SHA}", sha))
	}
	// What docker-compose.yml adds, with loopback addresses for the test.
	env = append(env, "DATABASE_URL="+pgtest.NewDB(t), "BROKER_HOST=127.0.0.1", "BROKER_PORT="+strconv.Itoa(httpPort),
		"CLUSTER_BIND=127.0.0.1:0", "NODE_NAME=image-test", "LOG_LEVEL=warn")

	argv := inImage(img, bin, slices.Concat(img.entrypoint, img.cmd))
	serve := exec.Command(argv[0], argv[1:]...)
	serve.Env = env
	var logs syncBuffer
	serve.Stdout, serve.Stderr = &logs, &logs
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- serve.Wait() }()
	t.Cleanup(func() {
		if serve.ProcessState == nil {
			_ = serve.Process.Kill()
			<-exited
		}
	})

	healthURL := "http://127.0.0.1:" + strconv.Itoa(httpPort) + "/health"
	deadline := time.Now().Add(30 * time.Second)
	var health struct{ Status, GitSHA, Node string }
	for {
		select {
		case err := <-exited:
			t.Fatalf("broker serve exited: %v\n%s", err, logs.String())
		default:
		}
		resp, err := http.Get(healthURL)
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&health)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node did not become healthy: %v\n%s", err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if health.GitSHA != sha || health.Node != "image-test" {
		t.Errorf("/health = %+v, want gitSha %s from the GIT_SHA build argument", health, sha)
	}

	hc := inImage(img, bin, img.healthcheck)
	if code, out, errOut := run(t, hc, env); code != 0 || !strings.Contains(out, `"status":"ok"`) {
		t.Fatalf("HEALTHCHECK %v against the running node: exit %d\n%s%s", img.healthcheck, code, out, errOut)
	}

	if err := serve.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("broker serve after SIGTERM: %v\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("broker serve did not stop within 30 s of SIGTERM\n%s", logs.String())
	}
	if code, _, errOut := run(t, hc, env); code != 1 || !strings.Contains(errOut, "healthcheck") {
		t.Fatalf("HEALTHCHECK with the node stopped: exit %d (want 1)\n%s", code, errOut)
	}
}

// `broker healthcheck --url` passes on 200 only; a node that answers 503
// (Postgres down) is unhealthy.
func TestHealthcheckCommand(t *testing.T) {
	bin := brokerBinary(t, parseImage(t))
	var status int
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		w.WriteHeader(status)
		_, _ = io.WriteString(w, `{"status":"`+http.StatusText(status)+`","path":"`+r.URL.Path+`"}`)
	}))
	defer srv.Close()
	for _, tc := range []struct {
		status, exit int
	}{{200, 0}, {503, 1}, {404, 1}} {
		mu.Lock()
		status = tc.status
		mu.Unlock()
		code, out, errOut := run(t, []string{bin, "healthcheck", "--url", srv.URL + "/health", "--timeout", "5s"}, nil)
		if code != tc.exit {
			t.Errorf("healthcheck against a %d: exit %d, want %d\n%s%s", tc.status, code, tc.exit, out, errOut)
		}
		if tc.exit == 0 && !strings.Contains(out, `"path":"/health"`) {
			t.Errorf("healthcheck prints %q, want the /health answer", out)
		}
	}
	// The default URL comes from BROKER_PORT and BROKER_HOST, as in the image.
	addr := strings.TrimPrefix(srv.URL, "http://")
	host, p := addr[:strings.LastIndex(addr, ":")], addr[strings.LastIndex(addr, ":")+1:]
	mu.Lock()
	status = 200
	mu.Unlock()
	if code, out, errOut := run(t, []string{bin, "healthcheck"}, []string{"BROKER_PORT=" + p, "BROKER_HOST=" + host}); code != 0 || !strings.Contains(out, `"path":"/health"`) {
		t.Errorf("healthcheck with BROKER_PORT=%s: exit %d\n%s%s", p, code, out, errOut)
	}
}

// The release and pre-deploy commands of every target run the image's
// migration: on an empty database the first applies the schema, the
// others find it up to date.
func TestMigrationCommands(t *testing.T) {
	img := parseImage(t)
	bin := brokerBinary(t, img)
	commands := map[string][]string{
		"docker-compose migrate service": slices.Concat(img.entrypoint, loadCompose(t).Services["migrate"].Command),
		"fly release_command":            slices.Concat(img.entrypoint, splitCommand(t, loadFly(t).Deploy.ReleaseCommand)),
	}
	for i, c := range loadRailway(t).Deploy.PreDeployCommand {
		// Railway runs it instead of the image's entrypoint.
		commands["railway preDeployCommand "+strconv.Itoa(i)] = splitCommand(t, c)
	}
	db := emptyDatabase(t)
	names := make([]string, 0, len(commands))
	for name := range commands {
		names = append(names, name)
	}
	slices.Sort(names)
	applied := 0
	for _, name := range names {
		argv := commands[name]
		if argv[0] != img.binary {
			t.Errorf("%s %v does not run the image's broker %s", name, argv, img.binary)
			continue
		}
		code, out, errOut := run(t, inImage(img, bin, argv), []string{"DATABASE_URL=" + db})
		if code != 0 {
			t.Errorf("%s %v: exit %d\n%s%s", name, argv, code, out, errOut)
			continue
		}
		if strings.HasPrefix(out, "applied migrations") {
			applied++
		} else if !strings.HasPrefix(out, "schema is up to date") {
			t.Errorf("%s printed %q", name, out)
		}
	}
	if applied != 1 {
		t.Errorf("%d commands applied migrations to the empty database, want exactly the first", applied)
	}
}
