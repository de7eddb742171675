// containerd's snapshotter conformance suite (snapshots/testsuite) against layerfs-snapshotter,
// reached as containerd reaches a proxy plugin: the gRPC client of snapshots/proxy on a unix
// socket. Each test of the suite gets its own service process on its own root.
//
// Built in GOPATH mode from Debian's packages (GO111MODULE=off, GOPATH=/usr/share/gocode);
// run by tests/snapshotter/test_conformance.py, which sets LAYERFS_SNAPSHOTTER (the console
// script) and puts mount.layerfs on PATH (the suite mounts what Mounts returns).
package conformance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestLayerfs(t *testing.T) {
	bin := os.Getenv("LAYERFS_SNAPSHOTTER")
	if bin == "" {
		t.Fatal("LAYERFS_SNAPSHOTTER is not set")
	}
	testsuite.SnapshotterSuite(t, "layerfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sock := filepath.Join(filepath.Dir(root), "snapshotter.sock")
		cmd := exec.Command(bin, "--address", sock, "--root", root)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		stop := func() error {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				return fmt.Errorf("layerfs-snapshotter: %w", err)
			}
			return nil
		}
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		conn, err := grpc.DialContext(dctx, "unix://"+sock, grpc.WithInsecure(), grpc.WithBlock())
		if err != nil {
			_ = stop()
			return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "layerfs")
		return sn, func() error {
			_ = sn.Close()
			_ = conn.Close()
			return stop()
		}, nil
	})
}
