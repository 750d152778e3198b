#!/usr/bin/env python3
"""The cold-start benchmark's images, pushed to a local registry (plain HTTP), none of them one
that hb's code paths were tuned on:

  REG/bench/py-app:v1      debian-app:v1 as it is: python3 runs /app/main.py (3 layers, 185 MB)
  REG/bench/build-step:v1  the same layers, a build step as its command: gcc compiles a C file,
                           then perl prints a line (cc1, as, ld, perl and their libraries)
  REG/bench/big-binary:v1  one layer: Debian's containerd (a 48 MB Go binary) with the libc it
                           links, run as `containerd --version`

Usage: bench/images.py [REGISTRY]   (default 127.0.0.1:15000; scripts/images.sh must have run)
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile
import urllib.request

REG = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:15000"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"


def req(method, path, body=None, headers=None):
    r = urllib.request.Request(f"http://{REG}{path}", data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(r) as resp:
        return resp.read(), resp.headers


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def put_blob(repo, data):
    d = digest(data)
    try:
        req("HEAD", f"/v2/{repo}/blobs/{d}")
        return d
    except urllib.error.HTTPError:
        pass
    _, h = req("POST", f"/v2/{repo}/blobs/uploads/")
    loc = h["Location"]
    loc = loc if loc.startswith("http") else f"http://{REG}{loc}"
    sep = "&" if "?" in loc else "?"
    r = urllib.request.Request(f"{loc}{sep}digest={d}", data=data, method="PUT",
                               headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(r).read()
    return d


def mount_blob(repo, d, source):
    try:
        req("POST", f"/v2/{repo}/blobs/uploads/?mount={d}&from={source}")
    except urllib.error.HTTPError as e:
        if e.code != 202:
            raise


def put_image(repo, tag, config, layers):
    """layers: [(mediaType, digest, size)] already in repo."""
    cfg = json.dumps(config, separators=(",", ":")).encode()
    cd = put_blob(repo, cfg)
    m = {"schemaVersion": 2, "mediaType": MANIFEST,
         "config": {"mediaType": CONFIG, "digest": cd, "size": len(cfg)},
         "layers": [{"mediaType": mt, "digest": d, "size": s} for mt, d, s in layers]}
    req("PUT", f"/v2/{repo}/manifests/{tag}", json.dumps(m).encode(), {"Content-Type": MANIFEST})
    print(f"bench images: pushed {REG}/{repo}:{tag}", file=sys.stderr)


def debian_app():
    m, _ = req("GET", "/v2/debian-app/manifests/v1", headers={"Accept": MANIFEST})
    m = json.loads(m)
    cfg, _ = req("GET", f"/v2/debian-app/blobs/{m['config']['digest']}")
    return m, json.loads(cfg)


def derived(repo, cmd):
    m, cfg = debian_app()
    for l in m["layers"]:
        mount_blob(repo, l["digest"], "debian-app")
    if cmd is not None:
        cfg["config"]["Cmd"] = cmd
    put_image(repo, "v1", cfg, [(l["mediaType"], l["digest"], l["size"]) for l in m["layers"]])


def big_binary(repo):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add_dir(name):
            i = tarfile.TarInfo(name)
            i.type, i.mode, i.mtime = tarfile.DIRTYPE, 0o755, 1704067200
            t.addfile(i)
        for d in ["usr", "usr/bin", "lib", "lib/x86_64-linux-gnu", "lib64", "tmp", "etc"]:
            add_dir(d)
        for src, name in [("/usr/bin/containerd", "usr/bin/containerd"),
                          ("/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6"),
                          ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2")]:
            data = open(src, "rb").read()
            i = tarfile.TarInfo(name)
            i.size, i.mode, i.mtime = len(data), 0o755, 1704067200
            t.addfile(i, io.BytesIO(data))
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    d = put_blob(repo, gz)
    config = {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
              "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/usr/bin/containerd", "--version"]},
              "rootfs": {"type": "layers", "diff_ids": [digest(raw)]}}
    put_image(repo, "v1", config, [("application/vnd.oci.image.layer.v1.tar+gzip", d, len(gz))])


derived("bench/py-app", None)
derived("bench/build-step", ["sh", "-c",
                             "printf 'int main(void){return 0;}\\n' > /tmp/a.c && gcc -O2 -c /tmp/a.c -o /tmp/a.o"
                             " && perl -e 'print qq(built\\n)'"])
big_binary("bench/big-binary")
