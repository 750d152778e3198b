//! The commands that read or maintain the store itself: images, inspect, rmi, export, layers,
//! diff, du, gc, fsck.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use hb_core::Digest;
use hb_images::{require_image, tree_of};
use hb_store::Store;
use indicatif::HumanBytes;

use crate::args::{Cmd, LayerCmd};
use crate::output::Out;
use crate::progress::Bar;
use crate::{export_rootfs, short_label};

/// Runs `cmd`, one of this module's commands, on `store`.
pub fn run(cmd: Cmd, store: &Arc<Store>, out: &Out) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Images { format } => {
            let sizes = store.image_sizes()?;
            if out.json {
                out.json_value(&sizes)?;
            } else if out.quiet {
                // As `docker images -q`: ids only, once each.
                let mut seen = std::collections::HashSet::new();
                let mut w = io::stdout().lock();
                for s in sizes.iter().filter(|s| seen.insert(s.digest)) {
                    writeln!(w, "{}", s.digest.short())?;
                }
            } else if let Some(f) = format.as_deref().map(hb_cli::output::Format::parse) {
                let mut w = io::stdout().lock();
                for s in &sizes {
                    writeln!(w, "{}", f.line(&serde_json::to_value(s)?)?)?;
                }
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "{:<50} {:<14} {:>10} {:>10} {:>10}", "IMAGE", "DIGEST", "SIZE", "UNIQUE", "SHARED")?;
                for s in sizes {
                    writeln!(
                        w,
                        "{:<50} {:<14} {:>10} {:>10} {:>10}",
                        s.name,
                        s.digest.short(),
                        HumanBytes(s.content_bytes).to_string(),
                        HumanBytes(s.unique_bytes).to_string(),
                        HumanBytes(s.shared_bytes).to_string()
                    )?;
                }
            }
        }
        Cmd::Inspect { image, .. } => {
            let (name, digest, rec) = require_image(store, &image)?;
            let manifest: serde_json::Value = serde_json::from_str(&rec.manifest)?;
            let config: serde_json::Value = serde_json::from_str(&rec.config)?;
            // The start-up order a cold start prefetches (published by `hb optimize` or learned on the
            // image's first cold start): its length in chunks, or null.
            let startup = store
                .aux(&hb_images::pull::startup_key(&digest))?
                .and_then(|raw| hb_core::StartupOrder::decode(&raw).ok())
                .map(|o| serde_json::json!({"chunks": o.chunks.len()}));
            let v = serde_json::json!({
                "name": name, "digest": digest, "platform": rec.platform,
                "manifestMediaType": rec.manifest_media_type, "manifest": manifest, "config": config,
                "startupOrder": startup,
            });
            serde_json::to_writer_pretty(io::stdout().lock(), &v)?;
            println!();
        }
        Cmd::Rmi { images } => {
            for q in &images {
                out.note(hb_images::untag(store, q)?);
            }
        }
        Cmd::Export { image, dir } => {
            let (name, _, rec) = require_image(store, &image)?;
            let layers: Vec<Digest> = rec.layers.iter().map(|l| l.diff_id).collect();
            let lazy = layers.iter().filter(|l| store.lazy_source(l).ok().flatten().is_some()).count();
            if lazy > 0 {
                bail!(
                    "{name} was pulled lazily ({lazy} layers not fetched yet): `hb pull {name}` fetches it whole, \
                     `hb mount` reads it as it is"
                );
            }
            let r = export_rootfs(store, &layers, &dir, out)?;
            out.note(format!("{name}: {} entries, {} into {}", r.entries, HumanBytes(r.bytes), dir.display()));
            out.json_value(&r)?;
        }
        Cmd::Layer(LayerCmd::Import { files }) => {
            let mut reports = Vec::new();
            for f in &files {
                let (input, len): (Box<dyn io::Read>, Option<u64>) = if f == Path::new("-") {
                    (Box::new(io::stdin().lock()), None)
                } else {
                    let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
                    let len = file.metadata().ok().map(|m| m.len());
                    (Box::new(file), len)
                };
                let bar = Bar::bytes(out, &format!("importing {}", f.display()), len);
                let r = store.import_layer(input, &bar).with_context(|| format!("importing {}", f.display()))?;
                bar.finish();
                if !out.json {
                    println!("{}", r.digest);
                    out.note(format!(
                        "{}: {} ({}), diff_id {}\n  {} entries, {} content in {} chunks ({} distinct)\n  new: {} in {} chunks, {} on disk; deduplicated: {}{}",
                        f.display(),
                        r.digest.short(),
                        r.compression.label(),
                        r.diff_id.short(),
                        r.entries,
                        HumanBytes(r.content_bytes),
                        r.chunk_refs,
                        r.unique_chunks,
                        HumanBytes(r.new_bytes),
                        r.new_chunks,
                        HumanBytes(r.stored_bytes),
                        HumanBytes(r.deduplicated_bytes),
                        if r.already_present { " (layer already stored)" } else { "" },
                    ));
                }
                reports.push(r);
            }
            out.json_value(&reports)?;
        }
        Cmd::Layer(LayerCmd::Export { layers, output, dir }) => {
            let digests = layers.iter().map(|l| store.resolve_layer(l)).collect::<Result<Vec<_>, _>>()?;
            if let Some(dir) = dir {
                let r = export_rootfs(store, &digests, &dir, out)?;
                out.note(format!("{}: {} entries, {}", dir.display(), r.entries, HumanBytes(r.bytes)));
                out.json_value(&r)?;
            } else {
                let output = output.expect("clap requires -o or --dir");
                if digests.len() != 1 {
                    bail!("a tar export takes exactly one layer (use --dir to merge several)");
                }
                if output == Path::new("-") {
                    if io::stdout().is_terminal() {
                        bail!("refusing to write a tar to a terminal; redirect stdout or use -o FILE");
                    }
                    store.export_layer_tar(&digests[0], BufWriter::new(io::stdout().lock()), &Bar::hidden())?;
                } else {
                    // Written beside the target and renamed at the end: a failed export leaves nothing.
                    let tmp = output.with_extension("hb-partial");
                    let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                    let bar = Bar::bytes(out, "exporting layer", None);
                    let written = (|| -> anyhow::Result<()> {
                        let mut w = BufWriter::new(f);
                        store.export_layer_tar(&digests[0], &mut w, &bar)?;
                        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                        std::fs::rename(&tmp, &output).with_context(|| format!("renaming to {}", output.display()))?;
                        Ok(())
                    })();
                    bar.finish();
                    if written.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    written?;
                    out.note(format!("wrote {}", output.display()));
                }
            }
        }
        Cmd::Layer(LayerCmd::Ls) => {
            let layers = store.list_layers()?;
            if out.json {
                out.json_value(&layers)?;
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "{:<19} {:<19} {:>8} {:>10} {:>8} PINNED", "DIFF_ID", "BLOB", "ENTRIES", "SIZE", "CHUNKS")?;
                for l in layers {
                    let blob = l.blobs.first().map(|b| b.short()).unwrap_or_else(|| "-".into());
                    writeln!(
                        w,
                        "{:<19} {:<19} {:>8} {:>10} {:>8} {}",
                        l.diff_id.short(),
                        blob,
                        l.entries,
                        HumanBytes(l.content_bytes).to_string(),
                        l.chunks,
                        if l.pinned { "yes" } else { "no" }
                    )?;
                }
            }
        }
        Cmd::Layer(LayerCmd::Rm { layers }) => {
            for l in &layers {
                let d = store.resolve_layer(l)?;
                if store.unpin_layer(&d)? {
                    out.note(format!("unpinned {d}; run `hb gc` to free its space"));
                } else {
                    out.note(format!("{d} was not pinned"));
                }
            }
        }
        Cmd::Diff { a, b } => {
            let ((da, ia), (db, ib)) = (tree_of(store, &a)?, tree_of(store, &b)?);
            let d = hb_core::diff(&ia, &ib);
            if out.json {
                let changes: Vec<_> = d
                    .changes
                    .iter()
                    .map(|c| serde_json::json!({"change": c.change, "path": format!("/{}", String::from_utf8_lossy(&c.path))}))
                    .collect();
                out.json_value(&serde_json::json!({
                    "a": da, "b": db, "changes": changes,
                    "needed_chunks": d.needed_chunks.len(), "needed_bytes": d.needed_bytes,
                }))?;
            } else {
                let mut w = io::stdout().lock();
                for c in &d.changes {
                    writeln!(w, "{} /{}", c.change.letter(), String::from_utf8_lossy(&c.path))?;
                }
                out.note(format!(
                    "{} changed paths; {} needs {} chunks ({}) that {} lacks",
                    d.changes.len(),
                    short_label(&db),
                    d.needed_chunks.len(),
                    HumanBytes(d.needed_bytes),
                    short_label(&da)
                ));
            }
        }
        Cmd::Du => {
            let u = store.usage()?;
            if out.json {
                out.json_value(&u)?;
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "store:        {}", store.root().display())?;
                writeln!(
                    w,
                    "layers:       {} ({} blobs, {} as they came in)",
                    u.layers,
                    u.blobs,
                    HumanBytes(u.blob_bytes)
                )?;
                writeln!(w, "logical:      {}", HumanBytes(u.logical_bytes))?;
                writeln!(
                    w,
                    "unique:       {} in {} chunks (dedup {:.2}x)",
                    HumanBytes(u.unique_bytes),
                    u.chunks,
                    u.dedup_ratio
                )?;
                writeln!(
                    w,
                    "stored:       {} packs ({} live) + {} metadata",
                    HumanBytes(u.pack_bytes),
                    HumanBytes(u.live_pack_bytes),
                    HumanBytes(u.metadata_bytes)
                )?;
                writeln!(
                    w,
                    "backing:      {} in {} passthrough files (`hb gc` frees those no layer needs)",
                    HumanBytes(u.backing_bytes),
                    u.backing_files
                )?;
                writeln!(w, "saving:       {:.2}x logical/stored", u.total_ratio)?;
            }
        }
        Cmd::Gc => {
            let bar = Bar::bytes(out, "compacting", None);
            let r = store.gc(&bar)?;
            bar.finish();
            out.note(gc_summary(&r));
            out.json_value(&r)?;
        }
        Cmd::Fsck { repair } => {
            let bar = Bar::bytes(out, "verifying", None);
            let mut r = store.fsck(&bar)?;
            bar.finish();
            if repair && !r.is_clean() {
                let done = store.repair(&r)?;
                out.note(format!(
                    "repair: removed {} damaged backing files and {} damaged index blobs kept for peers; checking again",
                    done.backing_removed, done.form_blobs_removed
                ));
                let bar = Bar::bytes(out, "verifying", None);
                r = store.fsck(&bar)?;
                bar.finish();
            }
            if out.json {
                out.json_value(&r)?;
            } else {
                for i in &r.issues {
                    println!("{}: {}: {}", i.kind, i.subject, i.detail);
                }
                out.note(format!(
                    "checked {} packs, {} chunks ({} verified), {} layers, {} blobs, {} refs, {} backing files: {}",
                    r.packs,
                    r.chunks,
                    HumanBytes(r.verified_bytes),
                    r.layers,
                    r.blobs,
                    r.refs,
                    r.backing_files,
                    if r.is_clean() { "clean".to_string() } else { format!("{} problems", r.issues.len()) }
                ));
            }
            if !r.is_clean() {
                return Ok(ExitCode::from(1));
            }
        }
        _ => unreachable!("dispatched here only with a store command"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `hb gc`'s one-line summary, the same with or without a daemon.
pub fn gc_summary(r: &hb_store::GcReport) -> String {
    format!(
        "removed {} layers and {} chunks; compacted {} and deleted {} packs; freed {}; removed {} unused backing files ({})",
        r.layers_removed,
        r.chunks_removed,
        r.packs_compacted,
        r.packs_deleted,
        HumanBytes(r.bytes_freed),
        r.backing_removed,
        HumanBytes(r.backing_bytes_freed)
    )
}
