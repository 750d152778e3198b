// containerd 1.6's own snapshotter conformance suite (snapshots/testsuite) against hb's
// snapshotter, reached the way containerd reaches a proxy plugin: its snapshots/proxy client over
// the daemon's gRPC socket. Each suite test gets a fresh `hb daemon` on the root it hands out.
//
// Built in GOPATH mode against Debian's golang-github-containerd-containerd-dev by
// scripts/snapshotter-conformance.sh (which copies this file into a private GOPATH); run as root
// (the suite mounts). HB_BIN is the hb binary under test (hb-engine must sit beside it).
package conformance

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestHbSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts: run as root")
	}
	bin := os.Getenv("HB_BIN")
	if bin == "" {
		t.Fatal("HB_BIN must name the hb binary under test")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("HB_BIN: %v", err)
	}
	testsuite.SnapshotterSuite(t, "hb", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startHb(ctx, bin, root)
	})
}

// startHb starts `hb daemon` with its store on root (the folder the suite hands out; its parent
// is the test's scratch folder, removed after the test) and returns the proxy client and a close
// function that stops the daemon with SIGTERM and checks it exited cleanly and left no mount.
func startHb(ctx context.Context, bin, root string) (snapshots.Snapshotter, func() error, error) {
	dir := filepath.Dir(root)
	// Isolated from the machine's settings as hb's own e2e tests do: a minimal config, no docker
	// credentials, no hosts.toml folders.
	cfg := filepath.Join(dir, "hb.toml")
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(cfg, []byte("version = 1\n"), 0o644); err != nil {
		return nil, nil, err
	}
	if err := os.MkdirAll(empty, 0o755); err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(dir, "hb.sock")
	snapSock := filepath.Join(dir, "snapshotter.sock")
	logPath := filepath.Join(dir, "daemon.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--root", root, "--config", cfg, "--socket", sock,
		"daemon", "--snapshotter-socket", snapSock)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(cleanEnv(), "DOCKER_CONFIG="+empty, "HB_HOSTS_DIR="+empty)
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logFile.Close() }()
	log.G(ctx).Infof("hb daemon pid %d on root %s (log %s)", cmd.Process.Pid, root, logPath)

	stop := func() error {
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("hb daemon had already exited (%v): %s", err, tail(logPath))
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			exited <- err // a second call (none expected) sees the same result
			if err != nil {
				return fmt.Errorf("hb daemon did not exit cleanly on SIGTERM (%v): %s", err, tail(logPath))
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("hb daemon still running 30 s after SIGTERM (killed): %s", tail(logPath))
		}
		if m := mountsUnder(dir); len(m) > 0 {
			return fmt.Errorf("mounts left under %s after the daemon stopped: %v", dir, m)
		}
		return nil
	}

	// Ready once the snapshotter socket accepts connections.
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", snapSock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			exited <- err
			return nil, nil, fmt.Errorf("hb daemon exited before serving %s (%v): %s", snapSock, err, tail(logPath))
		default:
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("hb daemon did not serve %s within 30 s: %s", snapSock, tail(logPath))
		}
		time.Sleep(20 * time.Millisecond)
	}

	// grpc 1.33 (Debian's) has no unix:// resolver: a context dialer names the socket.
	conn, err := grpc.DialContext(ctx, "localhost", grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", snapSock)
		}))
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("dialing %s: %w", snapSock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "hb")
	return sn, func() error {
		return firstErr(sn.Close(), conn.Close(), stop())
	}, nil
}

// firstErr is the first non-nil error (Go 1.19 has no errors.Join).
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// cleanEnv is this process's environment without hb's own variables.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k := kv[:strings.IndexByte(kv+"=", '=')]
		switch k {
		case "HB_ROOT", "HB_CONFIG", "HB_SOCKET", "HB_BIN":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// mountsUnder lists mount points at or below dir (from /proc/self/mountinfo).
func mountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	return out
}

// tail is the end of the daemon's log, for error messages.
func tail(path string) string {
	data, _ := os.ReadFile(path)
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return "\n--- hb daemon log (tail) ---\n" + string(bytes.Join(lines, []byte("\n")))
}
