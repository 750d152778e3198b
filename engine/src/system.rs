//! Docker's housekeeping commands: `hb system df`, `hb system prune`, `hb image prune`.
//!
//! Images are named in the store; containers live in the store root's `containers/` folder
//! (`hb_cli::container`). An image is in use while any container (running or not) was made
//! from it, as docker counts it, or while the daemon has it mounted (containerd's containers).
//! Removal goes through the daemon when one owns the store.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use hb_cli::output::{self, human_size, Out};
use hb_cli::{api, container, print_deleted, store_root, Global};
use hb_core::Digest;
use hb_store::Store;
use serde::Serialize;

/// One row of `hb system df`.
#[derive(Serialize, Default)]
pub struct DfRow {
    pub total: usize,
    pub active: usize,
    pub size: u64,
    pub reclaimable: u64,
}

/// The digests of the images `containers` were made from (names that no longer resolve are
/// skipped: their image is gone already).
fn images_in_use(store: &Store, containers: &[(PathBuf, container::State)]) -> HashSet<Digest> {
    containers.iter().filter_map(|(_, s)| hb_images::require_image(store, &s.image).ok().map(|(_, d, _)| d)).collect()
}

/// `hb system df`: images (bytes of their distinct chunks; reclaimable: what only unused images
/// hold), containers (writable layers and logs; reclaimable: stopped ones) and the store on disk
/// (packs, metadata, passthrough files; reclaimable: dead pack space `hb gc` compacts away).
pub fn df(g: &Global, store: &Store, out: &Out) -> anyhow::Result<ExitCode> {
    let listed = container::list(&store_root(g)?)?;
    let used = images_in_use(store, &listed);
    let sizes = store.image_sizes()?;
    let usage = store.usage()?;
    let mut images = DfRow { total: sizes.len(), size: usage.unique_bytes, ..DfRow::default() };
    for s in &sizes {
        if used.contains(&s.digest) {
            images.active += 1;
        } else {
            images.reclaimable += s.unique_bytes;
        }
    }
    let mut containers = DfRow::default();
    for (dir, s) in &listed {
        let bytes = container::size(dir);
        containers.total += 1;
        containers.size += bytes;
        if s.is_running() {
            containers.active += 1;
        } else {
            containers.reclaimable += bytes;
        }
    }
    let on_disk = usage.pack_bytes + usage.metadata_bytes + usage.backing_bytes;
    let dead = usage.pack_bytes.saturating_sub(usage.live_pack_bytes);
    if out.json {
        out.json_value(&serde_json::json!({"images": images, "containers": containers, "store": usage}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let pct = |part: u64, of: u64| (part * 100).checked_div(of).unwrap_or(0);
    let mut w = std::io::stdout().lock();
    writeln!(w, "{:<14}{:<8}{:<8}{:<12}RECLAIMABLE", "TYPE", "TOTAL", "ACTIVE", "SIZE")?;
    for (kind, r) in [("Images", &images), ("Containers", &containers)] {
        writeln!(
            w,
            "{kind:<14}{:<8}{:<8}{:<12}{} ({}%)",
            r.total,
            r.active,
            human_size(r.size),
            human_size(r.reclaimable),
            pct(r.reclaimable, r.size)
        )?;
    }
    writeln!(
        w,
        "{:<14}{:<8}{:<8}{:<12}{} ({}%)",
        "Store on disk",
        usage.layers,
        "",
        human_size(on_disk),
        human_size(dead),
        pct(dead, on_disk)
    )?;
    out.note(format!(
        "Images: uncompressed bytes of distinct chunks; Store on disk: the same compressed and deduplicated, \
         in {} layers (`hb du` for details)",
        usage.layers
    ));
    Ok(ExitCode::SUCCESS)
}

/// `hb image prune` (`containers` false) and `hb system prune` (true): stopped containers, with
/// `all` every image no container uses, then what `hb gc` frees. Asks first unless `force`.
pub fn prune(
    g: &Global,
    daemon: Option<api::Client>,
    all: bool,
    force: bool,
    containers: bool,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let root = store_root(g)?;
    let mut what = Vec::new();
    if containers {
        what.push("all stopped containers");
    }
    if all {
        what.push("all images without at least one container associated to them");
    }
    what.push("all layers and chunks no image uses (as `hb gc`)");
    if !force && !output::confirm(&what, out)? {
        return Ok(ExitCode::SUCCESS);
    }
    let mut reclaimed = 0;
    if containers {
        let (removed, freed) = container::prune(&root)?;
        print_deleted("Deleted Containers:", &removed);
        reclaimed += freed;
    }
    // Without a daemon this process owns the store for the whole prune; with one, a read-only
    // view finds the names and the daemon removes them.
    let store = crate::open_store_for(g, daemon.is_some(), out)?;
    if all {
        let mut used = images_in_use(&store, &container::list(&root)?);
        // What the daemon has mounted is in use too (containerd's containers, spares).
        if let Some(client) = &daemon {
            let mounts: Vec<api::ImageMount> = client.call("GET", "/v1/mounts", None::<&()>)?;
            used.extend(mounts.iter().filter_map(|m| m.digest.parse::<Digest>().ok()));
        }
        let unused: Vec<String> =
            store.image_names()?.into_iter().filter(|n| !used.contains(&n.digest)).map(|n| n.name).collect();
        match &daemon {
            Some(client) if !unused.is_empty() => {
                let _: Vec<String> =
                    client.call("POST", "/v1/images/remove", Some(&api::RemoveRequest { images: unused.clone() }))?;
            }
            Some(_) => {}
            None => {
                for name in &unused {
                    store.remove_image_name(name)?;
                }
            }
        }
        let lines: Vec<String> = unused.iter().map(|n| format!("untagged: {n}")).collect();
        print_deleted("Deleted Images:", &lines);
    }
    let gc: hb_store::GcReport = match &daemon {
        Some(client) => {
            drop(store);
            client.call("POST", "/v1/gc", None::<&()>)?
        }
        None => {
            let bar = crate::progress::Bar::bytes(out, "compacting", None);
            let r = store.gc(&bar)?;
            bar.finish();
            r
        }
    };
    out.note(crate::store_cmds::gc_summary(&gc));
    reclaimed += gc.bytes_freed + gc.backing_bytes_freed;
    println!("Total reclaimed space: {}", human_size(reclaimed));
    Ok(ExitCode::SUCCESS)
}
