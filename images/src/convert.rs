//! `hb convert` and `hb optimize`: write an image's accelerated form (layer indexes, chunk
//! tables, range-addressable chunk data, start-up order) to a registry, bound to the original
//! image in an OCI index. Format: docs/formats/lazy-image.md.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hb_core::lazy::{AccelConfig, AccelLayer};
use hb_core::{Digest, StartupOrder};
use hb_registry::{ImageRef, Registry, ResolvedImage, OCI_INDEX, OCI_MANIFEST};
use hb_store::Store;
use indicatif::HumanBytes;
use serde_json::json;

use crate::{ImagesError, Registries, Reporter, Result, Within};

#[derive(Debug, serde::Serialize)]
pub struct ConvertReport {
    pub src: String,
    pub dst: String,
    pub index_digest: Digest,
    pub accelerated_digest: Digest,
    pub layers: usize,
    /// Bytes of the original image's layers, and of hb's data and index blobs.
    pub original_bytes: u64,
    pub data_bytes: u64,
    pub index_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct OptimizeReport {
    pub reference: String,
    pub startup_chunks: usize,
    pub startup_bytes: u64,
    pub index_digest: Digest,
}

fn registry_for(
    registries: &dyn Registries,
    r: &ImageRef,
    plain_http: bool,
    platform: hb_registry::Platform,
) -> Result<Registry> {
    let creds = registries.credentials(r.registry())?;
    Ok(Registry::new(r, registries.options(r, plain_http, creds, platform)?)?)
}

/// Pushes the accelerated manifest for `cfg` and the index binding it to the original image
/// under `dst`'s tag. Returns (index digest, accelerated manifest digest).
fn push_binding(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    dst: &ImageRef,
    resolved: &ResolvedImage,
    cfg: &AccelConfig,
) -> Result<(Digest, Digest)> {
    let cfg_bytes = serde_json::to_vec(cfg).map_err(|e| ImagesError::Invalid(format!("encoding the config: {e}")))?;
    rt.block_on(reg.push_blob(dst, cfg_bytes.clone()))?;
    let manifest = hb_registry::accel_manifest(cfg, &cfg_bytes);
    let accel_digest = Digest::of(&manifest);
    rt.block_on(reg.push_manifest(&dst.with_digest(&accel_digest.to_string()), OCI_MANIFEST, manifest.clone()))?;
    let original = json!({
        "mediaType": resolved.manifest_media_type, "digest": resolved.manifest_digest.to_string(),
        "size": resolved.manifest.len(), "platform": hb_registry::platform_json(&resolved.platform),
    });
    let index = hb_registry::binding_index(
        vec![original],
        (&accel_digest, manifest.len() as u64),
        &resolved.platform,
        &resolved.manifest_digest,
    );
    rt.block_on(reg.push_manifest(dst, OCI_INDEX, index.clone()))?;
    Ok((Digest::of(&index), accel_digest))
}

#[allow(clippy::too_many_arguments)]
pub fn convert(
    registries: &dyn Registries,
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    src: &str,
    dst: &str,
    plain_http: bool,
    platform: hb_registry::Platform,
    zstd_level: i32,
    reporter: &dyn Reporter,
) -> Result<ConvertReport> {
    let sref = ImageRef::parse(src)?;
    let dref = ImageRef::parse(dst)?;
    if dref.digest().is_some() {
        return Err(ImagesError::Invalid(format!("the destination {dst} must be a tag, not a digest")));
    }
    let (sreg, resolved) = crate::pull::resolve(rt, {
        let creds = registries.credentials(sref.registry())?;
        registries.endpoints(&sref, plain_http, creds, platform.clone())?
    })?;
    if resolved.layers.iter().any(|l| !store.has_layer(&l.diff_id).unwrap_or(false)) {
        reporter.note(&format!("pulling {src} to convert it"));
        let origin = crate::delta::Origin { registries, plain_http, registry: Arc::new(sreg) };
        crate::pull::pull(rt, store.clone(), origin, resolved.clone(), reporter)?;
    }
    let sreg = registry_for(registries, &sref, plain_http, platform.clone())?;
    let dreg = registry_for(registries, &dref, plain_http, platform)?;
    rt.block_on(async {
        sreg.ensure_connected(&sref).await?;
        dreg.connect_push(&dref).await
    })?;

    // 1. The original image, so that every client still pulls it from DST.
    let mut originals: Vec<(Digest, u64)> = vec![(resolved.config_digest, resolved.config.len() as u64)];
    originals.extend(resolved.layers.iter().map(|l| (l.digest, l.size)));
    let same_registry = sref.registry() == dref.registry();
    for (d, size) in &originals {
        let mounted = same_registry && rt.block_on(dreg.mount_blob(&dref, &sref, d))?;
        if !mounted {
            let bytes = rt.block_on(sreg.fetch_bytes(&sref, d, *size)).within(|| format!("copying blob {d}"))?;
            rt.block_on(dreg.push_blob(&dref, bytes))?;
        }
    }
    rt.block_on(dreg.push_manifest(
        &dref.with_digest(&resolved.manifest_digest.to_string()),
        &resolved.manifest_media_type,
        resolved.manifest.clone(),
    ))?;

    // 2. Per layer: index, chunk table, chunk data (each chunk at `zstd_level`, or its stored bytes
    // verbatim at 0 or where they are smaller).
    let mut report = ConvertReport {
        src: sref.canonical(),
        dst: dref.canonical(),
        index_digest: Digest([0; 32]),
        accelerated_digest: Digest([0; 32]),
        layers: resolved.layers.len(),
        original_bytes: resolved.layers.iter().map(|l| l.size).sum(),
        data_bytes: 0,
        index_bytes: 0,
    };
    let mut layers = Vec::new();
    for l in &resolved.layers {
        let mut data = Vec::new();
        let (index, table) = store
            .layer_data(&l.diff_id, zstd_level, |b| data.extend_from_slice(b))
            .within(|| format!("layer {}", l.diff_id))?;
        let (index_raw, table_raw) = hb_registry::encode_layer_form(&index, &table)
            .map_err(|e| ImagesError::Invalid(format!("layer {}: {e}", l.diff_id)))?;
        let a = AccelLayer {
            diff_id: l.diff_id,
            blob: l.digest,
            index: Digest::of(&index_raw),
            index_size: index_raw.len() as u64,
            table: Digest::of(&table_raw),
            table_size: table_raw.len() as u64,
            data: Digest::of(&data),
            data_size: data.len() as u64,
        };
        report.data_bytes += a.data_size;
        report.index_bytes += a.index_size + a.table_size;
        rt.block_on(async {
            dreg.push_blob(&dref, index_raw).await?;
            dreg.push_blob(&dref, table_raw).await?;
            dreg.push_blob(&dref, data).await
        })?;
        layers.push(a);
    }
    let cfg = AccelConfig {
        version: 1,
        manifest: resolved.manifest_digest,
        config: resolved.config_digest,
        layers,
        startup: None,
    };
    let (index_digest, accel) = push_binding(rt, &dreg, &dref, &resolved, &cfg)?;
    report.index_digest = index_digest;
    report.accelerated_digest = accel;
    reporter.note(&format!(
        "{} -> {}: {} layers; {} of chunk data, {} of indexes (original layers {})",
        report.src,
        report.dst,
        report.layers,
        HumanBytes(report.data_bytes),
        HumanBytes(report.index_bytes),
        HumanBytes(report.original_bytes)
    ));
    Ok(report)
}

/// Mounts an overlayfs at `merged`: `lower` (the image's read-only mount) under `upper`.
fn overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> std::io::Result<()> {
    for p in [lower, upper, work] {
        if p.to_string_lossy().contains([',', ':', '\\']) {
            return Err(std::io::Error::other(format!(
                "{} has a character overlayfs options cannot hold",
                p.display()
            )));
        }
    }
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    let opts = std::ffi::CString::new(opts).map_err(std::io::Error::other)?;
    rustix::mount::mount("overlay", merged, "overlay", rustix::mount::MountFlags::empty(), Some(opts.as_c_str()))
        .map_err(std::io::Error::from)
}

/// A mount detached when this is dropped (best effort: a recording's scratch layer).
struct Detach(std::path::PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(dir = %self.0.display(), error = %e, "unmounting the recording's overlay failed");
        }
    }
}

/// The command an image starts with, its environment and working directory, from its config.
fn image_command(config: &[u8]) -> Result<(Vec<String>, Vec<String>, Option<String>)> {
    let v: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| ImagesError::Invalid(format!("the image config: {e}")))?;
    let c = &v["config"];
    let strings = |x: &serde_json::Value| -> Vec<String> {
        x.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let mut cmd = strings(&c["Entrypoint"]);
    cmd.extend(strings(&c["Cmd"]));
    let wd = c["WorkingDir"].as_str().filter(|s| !s.is_empty()).map(String::from);
    Ok((cmd, strings(&c["Env"]), wd))
}

#[allow(clippy::too_many_arguments)]
pub fn optimize(
    registries: &dyn Registries,
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    reference: &str,
    command: &[String],
    seconds: u64,
    plain_http: bool,
    reporter: &dyn Reporter,
) -> Result<OptimizeReport> {
    let r = ImageRef::parse(reference)?;
    // One client reads the image, then (authorized for push) writes its new accelerated form.
    let reg = Arc::new(registry_for(registries, &r, plain_http, hb_registry::Platform::default())?);
    let resolved = rt.block_on(reg.resolve(&r))?;
    let Some(accel) = resolved.accelerated else {
        return Err(ImagesError::Invalid(format!("{reference} has no accelerated form; run `hb convert` first")));
    };
    let mut cfg = rt.block_on(reg.fetch_accel_config(&r, &accel, &resolved.manifest_digest))?;
    crate::pull::pull_lazy(rt, store.clone(), reg.clone(), resolved.clone(), registries.blob_peers())?;
    let (image_cmd, env, wd) = image_command(&resolved.config)?;
    let cmd = if command.is_empty() { image_cmd } else { command.to_vec() };
    if cmd.is_empty() {
        return Err(ImagesError::Invalid(format!("{reference} has no entrypoint or cmd; give a command after --")));
    }
    let dir =
        tempfile::Builder::new().prefix("hb-optimize-").tempdir().map_err(ImagesError::io("a folder to mount in"))?;
    let (lower, upper, work, merged) =
        (dir.path().join("lower"), dir.path().join("upper"), dir.path().join("work"), dir.path().join("root"));
    for d in [&lower, &upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(ImagesError::io(format!("creating {}", d.display())))?;
    }
    let args = crate::mount::MountArgs {
        platform: None,
        image: reference.to_string(),
        dir: lower.clone(),
        prefetch: hb_fuse::Prefetch::None,
        bandwidth: None,
        passthrough: false,
        threads: 8,
        plain_http,
        layers: None,
        learn: false,
        command: None,
    };
    let m = crate::mount::mount_image(registries, rt, store.clone(), &args, None, None, None, None, reporter)?;
    // The command runs as in a container, over a writable layer (a build step writes its output;
    // on the read-only mount it failed at once and the order held only the shell's first reads).
    // Declared after the mount: dropped (detached) before it on every path out, errors included.
    let scratch = match overlay(&lower, &upper, &work, &merged) {
        Ok(()) => Some(Detach(merged.clone())),
        Err(e) => {
            reporter.note(&format!(
                "no writable layer for the recording (overlayfs: {e}); the command runs on the read-only image"
            ));
            None
        }
    };
    let run_root = if scratch.is_some() { merged.clone() } else { lower.clone() };
    m.mounted.fetcher().start_recording();
    reporter.note(&format!("recording the start-up of `{}` for up to {seconds} s", cmd.join(" ")));
    // chroot and chdir in the child itself: the image may have neither a shell nor the host's
    // `chroot` on its PATH (a single static binary, PATH=/usr/bin).
    let root = std::ffi::CString::new(run_root.as_os_str().as_encoded_bytes())
        .map_err(|_| ImagesError::Invalid("the mount folder has a NUL byte".into()))?;
    let cwd = std::ffi::CString::new(wd.clone().unwrap_or_else(|| "/".into()))
        .map_err(|_| ImagesError::Invalid(format!("{reference}: its working directory has a NUL byte")))?;
    let mut run = std::process::Command::new(&cmd[0]);
    // SAFETY: between fork and exec only async-signal-safe calls (chroot, chdir) on prepared strings.
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut run, move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(cwd.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = run
        .args(&cmd[1..])
        .env_clear()
        .envs(env.iter().filter_map(|e| e.split_once('=')))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(ImagesError::io(format!("running `{}` in the mounted image", cmd[0])))?;
    let started = Instant::now();
    while child.try_wait().map_err(ImagesError::io("waiting for the command"))?.is_none()
        && started.elapsed() < Duration::from_secs(seconds)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let order = m.mounted.fetcher().take_recording();
    drop(scratch);
    hb_fuse::unmount(&lower)?;
    m.mounted.wait()?;

    let startup = StartupOrder { chunks: order };
    let raw = startup.encode();
    let startup_bytes: u64 = {
        let sizes: std::collections::HashMap<_, _> = cfg
            .layers
            .iter()
            .filter_map(|l| store.layer(&l.diff_id).ok().flatten())
            .flat_map(|i| i.chunks.into_iter().map(|c| (c.id, c.len)))
            .collect();
        startup.chunks.iter().filter_map(|c| sizes.get(c)).map(|l| *l as u64).sum()
    };
    rt.block_on(reg.connect_push(&r))?;
    cfg.startup = Some((Digest::of(&raw), raw.len() as u64));
    rt.block_on(reg.push_blob(&r, raw.clone()))?;
    store.put_aux(&crate::pull::startup_key(&resolved.manifest_digest), &raw)?;
    let index_digest = push_binding(rt, &reg, &r, &resolved, &cfg)?.0;
    reporter.note(&format!(
        "{reference}: start-up order of {} chunks ({}) stored in the accelerated image",
        startup.chunks.len(),
        HumanBytes(startup_bytes)
    ));
    Ok(OptimizeReport { reference: r.canonical(), startup_chunks: startup.chunks.len(), startup_bytes, index_digest })
}
