// containerd's own snapshotter test suite (containerd 1.6), run against
// `pronto serve` through containerd's proxy snapshotter client: the same
// path containerd uses for a `[proxy_plugins]` snapshotter. Every case
// starts a fresh daemon with its own root and socket.
package suite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func startPronto(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "pronto.sock")
	config := filepath.Join(root, "config.toml")
	text := fmt.Sprintf("root = %q\naddress = %q\n[registry]\nhosts_dir = %q\n",
		filepath.Join(root, "state"), sock, filepath.Join(root, "certs.d"))
	if err := os.WriteFile(config, []byte(text), 0o600); err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(os.Getenv("PRONTO_BIN"), "--config", config, "serve")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		err := cmd.Wait()
		// The keeper pronto serve started holds its mounts and socket for
		// a next daemon; there is none here.
		keeper := exec.Command(os.Getenv("PRONTO_BIN"), "--config", config, "keeper", "--stop")
		keeper.Stdout, keeper.Stderr = os.Stderr, os.Stderr
		_ = keeper.Run()
		return err
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i == 400 {
			stop()
			return nil, nil, fmt.Errorf("pronto serve did not create %s", sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The socket path is no valid HTTP/2 authority; name loopback instead.
	conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "pronto")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

func TestPronto(t *testing.T) {
	if os.Getenv("PRONTO_BIN") == "" {
		t.Fatal("PRONTO_BIN must name the pronto binary")
	}
	testsuite.SnapshotterSuite(t, "Pronto", startPronto)
}

// The reference: containerd's overlayfs snapshotter in the same suite.
func TestOverlay(t *testing.T) {
	testsuite.SnapshotterSuite(t, "Overlay", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := overlay.NewSnapshotter(root)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}
