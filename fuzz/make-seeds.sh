#!/usr/bin/env bash
# Regenerates the checked-in seed corpora under fuzz/corpus/<target>/ (small valid inputs):
# binary formats with hb's own encoders (seedgen/), tar layers and text inputs here. Run it after
# a format change; scripts/fuzz.sh only reads the seeds.
set -euo pipefail
cd "$(dirname "$0")"
out=$PWD/corpus
rm -rf "$out"
mkdir -p "$out"
export CARGO_TARGET_DIR=${HB_FUZZ_TARGET_DIR:-/var/tmp/hb-fuzz-target}
cp ../Cargo.lock seedgen/Cargo.lock
(cd seedgen && cargo run --release -q -- "$out")

python3 - "$out" <<'PY'
import gzip, io, os, subprocess, sys, tarfile

out = sys.argv[1]

def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def tar(entries, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in entries:
            info.mtime = info.mtime or 1700000000
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()

def entry(name, kind=tarfile.REGTYPE, data=None, **kw):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    if data is not None:
        i.size = len(data)
    for k, v in kw.items():
        setattr(i, k, v)
    return i, data

small = [
    entry("etc/", tarfile.DIRTYPE),
    entry("etc/hostname", data=b"hb\n"),
]
every = [
    entry("./", tarfile.DIRTYPE),
    entry("bin/", tarfile.DIRTYPE),
    entry("bin/busybox", data=b"\x7fELF" + bytes(range(256)) * 2, mode=0o4755, uid=1000, gid=1000),
    entry("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
    entry("bin/ls", tarfile.LNKTYPE, linkname="bin/busybox"),
    entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
    entry("run/fifo", tarfile.FIFOTYPE),
    entry("var/.wh..wh..opq", data=b""),
    entry("etc/.wh.motd", data=b""),
]
pax = [
    entry("usr/", tarfile.DIRTYPE),
    entry("usr/bin/ping", data=b"ping", pax_headers={
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "mtime": "1700000000.25", "uid": "4294967294", "gid": "0",
    }),
    entry("usr/share/" + "long-name-" * 12 + "x", data=b"long"),
    entry("old", data=b"before the epoch", pax_headers={"mtime": "-3.25"}),
]
put("tar_ingest", "small.tar", tar(small, tarfile.USTAR_FORMAT))
put("tar_ingest", "every-kind.tar", tar(every, tarfile.GNU_FORMAT))
put("tar_ingest", "pax.tar", tar(pax, tarfile.PAX_FORMAT))
put("tar_ingest", "small.tar.gz", gzip.compress(tar(small, tarfile.USTAR_FORMAT), mtime=0))
put("tar_ingest", "every-kind.tar.gz", gzip.compress(tar(every, tarfile.GNU_FORMAT), mtime=0))
zst = subprocess.run(["zstd", "-q", "-c", "-3"], input=tar(pax, tarfile.PAX_FORMAT), capture_output=True, check=True)
put("tar_ingest", "pax.tar.zst", zst.stdout)
put("tar_ingest", "empty-archive.tar", b"\0" * 1024)

d = "sha256:" + "0123456789abcdef" * 4
for i, s in enumerate([
    "busybox", "docker.io/library/busybox:latest", "127.0.0.1:5000/a/b:v1@" + d, "localhost/x",
    "[::1]:5000/foo:1.0", "ghcr.io/org/repo@" + d, "linux/arm64/v8", "linux/amd64",
]):
    put("image_ref", f"{i}", s)
for i, s in enumerate([
    "/v2/", "/v2/?ns=docker.io", "/v2/busybox/manifests/latest", "/v2/library/busybox/manifests/" + d,
    "/v2/ghcr.io/org/repo/blobs/" + d, "/v2/local/x/tags/list", "/v2/foo/referrers/" + d + "?ns=127.0.0.1%3A15000",
    "/v2/x/blobs/uploads/", "/v2/a/b/manifests/v1?ns=ghcr.io&x=1",
]):
    put("mirror_route", f"{i}", s)
for i, s in enumerate([
    "bytes=0-99", "bytes=-500", "bytes=100-", "bytes=1-2,3-4", "  bytes= 5 - 9 ", "bytes=0-1048575",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json, application/json;q=0.5",
    "*/*", "text/plain; charset=utf-8",
]):
    put("range_header", f"{i}", s)
for i, s in enumerate([
    "name==layer1", 'parent!=""', 'kind==committed,labels."containerd.io/snapshot.ref"', "labels.a.b==c\nname~=x",
    'labels."a.b"!=c,name', "",
]):
    put("snapshot_filters", f"{i}", s)
passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n"
group = "root:x:0:\nwheel:x:10:app,root\napp:x:1000:\n"
for i, (cfg, user) in enumerate([
    ('{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],'
     '"Env":["PATH=/usr/bin:/bin"],"WorkingDir":"/app","User":"%s"},"rootfs":{"type":"layers","diff_ids":[]}}', "app"),
    ('{"config":{"Cmd":["/bin/sh"],"User":"%s"}}', "1000:wheel"),
    ('{"config":{"User":"%s"}}', "nobody:65534"),
    ('{"config":null}', ""),
]):
    put("image_config", f"{i}", (cfg.replace("%s", user) if "%s" in cfg else cfg) + "\0" + passwd + "\0" + group)
for i, s in enumerate(["512", "64k", "10M", "1.5g", "2T", "1PiB", "7MB", "0.5", "6m", "1.25"]):
    put("sizes", f"{i}", s)
put("host_config", "hosts.toml", '''server = "https://registry.test"

[host."https://registry.test"]
  capabilities = ["pull", "resolve"]
  ca = "ca.pem"
  skip_verify = true

[host."http://mirror.local:5000"]
  capabilities = ["pull"]
''')
put("host_config", "hosts-ca-list.toml", 'server = "http://registry.test"\n[host."http://registry.test"]\nca = ["ca.pem", "ca.pem"]\n')
put("host_config", "hb.toml", '''version = 1
[store]
root = "/var/lib/hb"
zstd_level = 3
max_layer_bytes = 1073741824
max_ratio = 1000
[daemon]
socket = "/run/hb/hb.sock"
mount_idle_seconds = 600
[proxy]
listen = "127.0.0.1:5000"
max_size = "50G"
memory_cache = "256M"
default_upstream = "docker.io"
[[proxy.user]]
name = "ci"
password = "x"
[[proxy.upstream]]
host = "docker.io"
url = "https://registry-1.docker.io"
tag_ttl = [ { pattern = "*:latest", seconds = 60 } ]
[[proxy.upstream]]
host = "10.0.0.5:5000"
alias = "builds"
skip_verify = false
''')

# Manifests and indexes (then NUL, then the config), as registries send them.
d = "sha256:" + "ab" * 32
cfg = '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]}}' % d
man = '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":123}]}' % (d, len(cfg), d)
put("manifest", "oci-image", man + "\0" + cfg)
put("manifest", "docker-image", man.replace("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json").replace("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip") + "\0" + cfg)
idx = '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":500,"platform":{"architecture":"amd64","os":"linux"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":400,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.hyperbox.accelerated":"v1"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":500,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}' % (d, d, d)
put("manifest", "index", idx)
PY
du -sh "$out"
