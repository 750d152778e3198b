//! The gRPC face of [`Snapshots`]: containerd's Snapshots service, errors as the codes containerd
//! expects (AlreadyExists, NotFound, FailedPrecondition, InvalidArgument).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::{self, snapshots_server::SnapshotsServer};
use crate::{Kind, MountSpec, SnapError, Snapshot, Snapshots};

impl From<SnapError> for Status {
    fn from(e: SnapError) -> Status {
        let msg = e.to_string();
        match e {
            SnapError::AlreadyExists(_) => Status::already_exists(msg),
            SnapError::NotFound(_) => Status::not_found(msg),
            SnapError::FailedPrecondition(_) => Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => Status::invalid_argument(msg),
            SnapError::Internal(_) => Status::internal(msg),
        }
    }
}

fn mounts(v: Vec<MountSpec>) -> Vec<api::types::Mount> {
    v.into_iter()
        .map(|m| api::types::Mount { r#type: m.kind, source: m.source, target: String::new(), options: m.options })
        .collect()
}

fn info(s: Snapshot) -> api::Info {
    let ts = |(seconds, nanos): (i64, u32)| prost_types::Timestamp { seconds, nanos: nanos as i32 };
    api::Info {
        name: s.name,
        parent: s.parent,
        kind: match s.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(ts(s.created)),
        updated_at: Some(ts(s.updated)),
        labels: s.labels.into_iter().collect(),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// Runs blocking snapshot work (disk walks, fsyncs) off the async threads.
async fn blocking<T: Send + 'static>(
    s: &Arc<Snapshots>,
    f: impl FnOnce(&Snapshots) -> Result<T, SnapError> + Send + 'static,
) -> Result<T, Status> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| Status::internal(format!("snapshot work failed: {e}")))?
        .map_err(Status::from)
}

/// The service over shared [`Snapshots`].
pub struct Service(pub Arc<Snapshots>);

impl Service {
    pub fn into_server(self) -> SnapshotsServer<Service> {
        SnapshotsServer::new(self)
    }
}

type ListStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let m = blocking(&self.0, move |s| s.create(Kind::Active, &r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(&self, r: Request<api::ViewSnapshotRequest>) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let m = blocking(&self.0, move |s| s.create(Kind::View, &r.key, &r.parent, labels(r.labels))).await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(&self, r: Request<api::MountsRequest>) -> Result<Response<api::MountsResponse>, Status> {
        let key = r.into_inner().key;
        let m = blocking(&self.0, move |s| s.mounts(&key)).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        blocking(&self.0, move |s| s.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = r.into_inner().key;
        blocking(&self.0, move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<api::StatSnapshotRequest>) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let s = self.0.stat(&r.into_inner().key)?;
        Ok(Response::new(api::StatSnapshotResponse { info: Some(info(s)) }))
    }

    async fn update(
        &self,
        r: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = blocking(&self.0, move |s| s.update(&i.name, labels(i.labels), &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse { info: Some(info(s)) }))
    }

    type ListStream = ListStream;

    async fn list(&self, r: Request<api::ListSnapshotsRequest>) -> Result<Response<ListStream>, Status> {
        let all = self.0.list(&r.into_inner().filters)?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.iter().cloned().map(info).collect() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, r: Request<api::UsageRequest>) -> Result<Response<api::UsageResponse>, Status> {
        let key = r.into_inner().key;
        let (size, inodes) = blocking(&self.0, move |s| s.usage(&key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _r: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let n = blocking(&self.0, |s| s.cleanup()).await?;
        tracing::info!(folders = n, "snapshot cleanup");
        Ok(Response::new(()))
    }
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    snapshots: Arc<Snapshots>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(Service(snapshots).into_server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
}
