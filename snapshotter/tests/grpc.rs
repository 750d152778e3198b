//! The service over a real Unix socket with tonic's generated client: gRPC codes as containerd
//! expects them, List's filters and streaming.

use std::collections::HashMap;
use std::sync::Arc;

use hb_snapshotter::api::snapshots_client::SnapshotsClient;
use hb_snapshotter::api::*;
use tonic::Code;

async fn client(path: std::path::PathBuf) -> SnapshotsClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::try_from("http://snapshotter")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    SnapshotsClient::new(channel)
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_service_keeps_containerd_s_codes_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let snaps = Arc::new(hb_snapshotter::Snapshots::open(&dir.path().join("snaps")).unwrap());
    let sock = dir.path().join("s.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hb_snapshotter::service::serve(snaps, listener, async {
        let _ = stopped.await;
    }));
    let mut c = client(sock).await;
    let prep = |key: &str, parent: &str, l: &[(&str, &str)]| PrepareSnapshotRequest {
        snapshotter: "hb".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    };
    let m = c.prepare(prep("a", "", &[])).await.unwrap().into_inner().mounts;
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(c.prepare(prep("a", "", &[])).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(c.prepare(prep("b", "missing", &[])).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.prepare(prep("b", "a", &[])).await.unwrap_err().code(), Code::InvalidArgument, "parent not committed");
    let commit = |name: &str, key: &str, l: &[(&str, &str)]| CommitSnapshotRequest {
        snapshotter: "hb".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(l),
    };
    c.commit(commit("base", "a", &[("team", "db")])).await.unwrap();
    c.prepare(prep("b", "base", &[("team", "web")])).await.unwrap();
    c.view(ViewSnapshotRequest {
        snapshotter: "hb".into(),
        key: "v".into(),
        parent: "base".into(),
        labels: labels(&[]),
    })
    .await
    .unwrap();
    assert_eq!(c.commit(commit("x", "v", &[])).await.unwrap_err().code(), Code::FailedPrecondition, "a view");
    let rm = |key: &str| RemoveSnapshotRequest { snapshotter: "hb".into(), key: key.into() };
    assert_eq!(c.remove(rm("base")).await.unwrap_err().code(), Code::FailedPrecondition, "has children");
    assert_eq!(c.remove(rm("nope")).await.unwrap_err().code(), Code::NotFound);
    let mounts = |key: &str| MountsRequest { snapshotter: "hb".into(), key: key.into() };
    assert_eq!(c.mounts(mounts("base")).await.unwrap_err().code(), Code::FailedPrecondition, "committed");
    let m = c.mounts(mounts("b")).await.unwrap().into_inner().mounts;
    assert_eq!(m[0].r#type, "overlay");
    // Stat and Update (labels only).
    let info = c
        .stat(StatSnapshotRequest { snapshotter: "hb".into(), key: "base".into() })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!((info.kind, info.labels.get("team").map(String::as_str)), (Kind::Committed as i32, Some("db")));
    let mut upd = info.clone();
    upd.labels = labels(&[("team", "ops")]);
    let req = UpdateSnapshotRequest {
        snapshotter: "hb".into(),
        info: Some(upd),
        update_mask: Some(prost_types::FieldMask { paths: vec!["labels.team".into()] }),
    };
    let info = c.update(req).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.labels.get("team").map(String::as_str), Some("ops"));
    // Walk with filters (streamed).
    let list = |f: &[&str]| ListSnapshotsRequest {
        snapshotter: "hb".into(),
        filters: f.iter().map(|s| s.to_string()).collect(),
    };
    let mut names = Vec::new();
    let mut stream = c.list(list(&["kind==active", "labels.team==ops"])).await.unwrap().into_inner();
    while let Some(batch) = stream.message().await.unwrap() {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names.sort();
    assert_eq!(names, ["b", "base"]);
    assert_eq!(c.list(list(&["name~=b.*"])).await.unwrap_err().code(), Code::InvalidArgument);
    // Usage and Cleanup.
    let u = c.usage(UsageRequest { snapshotter: "hb".into(), key: "b".into() }).await.unwrap().into_inner();
    assert_eq!((u.size, u.inodes), (0, 0), "nothing written yet");
    c.cleanup(CleanupRequest { snapshotter: "hb".into() }).await.unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
