// containerd-stargz-grpc for the cold-start benchmark: stargz-snapshotter's own service
// (service.NewStargzSnapshotterService, from Debian's golang-github-containerd-stargz-snapshotter-dev)
// served as containerd's snapshots gRPC service on a Unix socket, as upstream's daemon does, with a
// memory metadata store and the docker-config keychain. Upstream's main also wires CRI and
// kubeconfig keychains, which need packages Debian does not ship; nothing else differs.
// Built by scripts/stargz.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "where snapshots and the cache live")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	plainHTTP := flag.String("plain-http", "", "a registry host[:port] reached over plain HTTP")
	noPrefetch := flag.Bool("no-prefetch", false, "do not prefetch the landmark (optimized) part of layers")
	flag.Parse()
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg service.Config
	cfg.Config.NoPrefetch = *noPrefetch
	if *plainHTTP != "" {
		cfg.ResolverConfig.Host = map[string]resolver.HostConfig{
			*plainHTTP: {Mirrors: []resolver.MirrorConfig{{Host: *plainHTTP, Insecure: true}}},
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, *root, &cfg,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
	go func() {
		if err := rpc.Serve(l); err != nil {
			fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: serving: %v\n", err)
			os.Exit(1)
		}
	}()
	fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: serving on %s\n", *address)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	rpc.Stop()
	if err := sn.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: closing: %v\n", err)
	}
}
