use super::*;

#[test]
fn metric_paths_are_a_bounded_set() {
    assert_eq!(super::metric_path("/v1/pull"), "/v1/pull");
    assert_eq!(super::metric_path("/v1/mounts/sha256:abc"), "/v1/mounts/{digest}");
    assert_eq!(super::metric_path("/v1/no-such/../thing?x=1"), "other");
    assert_eq!(super::metric_path("/random-1234"), "other");
}

/// A daemon on a fresh store with one (pretend) image mount, and a spare's request for it.
fn daemon(dir: &Path) -> (Arc<Daemon>, std::sync::mpsc::Receiver<Refill>, Refill) {
    let root = dir.join("store");
    let store = Arc::new(hb_store::Store::open(&root, hb_store::StoreOptions::default()).unwrap());
    let g = Global {
        root: Some(root.clone()),
        config: None,
        hosts_dir: None,
        socket: None,
        json: false,
        quiet: true,
        verbose: 0,
    };
    let (d, refills) = Daemon::new(&g, root.clone(), store, Duration::from_secs(600)).unwrap();
    let key = format!("sha256:{}", "ab".repeat(32));
    let lower = dir.join("image");
    std::fs::create_dir_all(&lower).unwrap();
    let m = ImageMount {
        image: "r/busybox:latest".into(),
        digest: key.clone(),
        path: lower.clone(),
        pid: std::process::id(),
        config: "{}".into(),
        users: 0,
        layers: None,
        spare: None,
    };
    d.mounts.lock().unwrap().insert(key.clone(), m);
    let r = Refill { key, lower, image: "r/busybox:latest".into(), plain_http: false };
    (d, refills, r)
}

/// Runs `f` on a thread of `s` and returns once that thread waits on a lock (a futex, as its
/// `wchan` in /proc says): it has gone as far as it can, however loaded the machine is.
fn spawn_until_blocked<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = s.spawn(move || {
        // "/proc/thread-self" is "<pid>/task/<tid>".
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        tx.send(me.file_name().unwrap().to_string_lossy().into_owned()).unwrap();
        f()
    });
    let tid = rx.recv().unwrap();
    let t = std::time::Instant::now();
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default();
        if wchan.starts_with("futex") {
            return h;
        }
        assert!(!h.is_finished(), "the thread finished without waiting on the lock");
        assert!(t.elapsed() < Duration::from_secs(30), "the thread never waited on a lock (wchan {wchan:?})");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn spare_folder(d: &Daemon) -> PathBuf {
    let dir = crate::container::containers_dir(&d.root).join(crate::container::new_id());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_new_spare_is_listed_no_sooner_than_its_advertisement_is_settled() {
    // Regression: a spare went on the list before it was advertised; handed out in between,
    // its withdrawal found no advertisement ("still the daemon's"), and the advertisement
    // then written named a folder another container was using.
    let tmp = tempfile::tempdir().unwrap();
    let (d, _refills, r) = daemon(tmp.path());
    let dir = spare_folder(&d);
    let held = d.advertised.lock().unwrap();
    std::thread::scope(|s| {
        // Once it waits on the advertisements lock it has gone as far as it can.
        let publishing = spawn_until_blocked(s, || d.publish(&dir, &r));
        assert!(!d.is_spare(&r.key, &dir), "listed while its advertisement was not settled");
        drop(held);
        publishing.join().unwrap();
    });
    assert!(d.is_spare(&r.key, &dir));
    // The reference names no image in this store: listed, not advertised.
    assert!(d.advertised.lock().unwrap().is_empty());
    assert!(!api::ready_file(&d.root, &r.image, r.plain_http).exists());
}

#[test]
fn a_spare_taken_while_it_still_counts_as_being_prepared_is_replaced() {
    // Regression: the refill asked for by whoever took the spare was dropped (one was being
    // prepared), and no spare was made again.
    let tmp = tempfile::tempdir().unwrap();
    let (d, refills, r) = daemon(tmp.path());
    d.refill(r.clone());
    assert_eq!(refills.try_recv().map(|x| x.key).ok(), Some(r.key.clone()));
    let dir = spare_folder(&d);
    d.publish(&dir, &r);
    let m = d.mounts.lock().unwrap().get(&r.key).cloned().unwrap();
    assert_eq!(d.take_spare(&m, &r.image, r.plain_http), Some(dir.clone()));
    assert!(refills.try_recv().is_err(), "asked again while one is being prepared");
    d.prepared(&dir, r.clone());
    assert_eq!(refills.try_recv().map(|x| x.key).ok(), Some(r.key.clone()), "the taken spare was not replaced");
    // One not taken is not replaced.
    let next = spare_folder(&d);
    d.publish(&next, &r);
    d.prepared(&next, r.clone());
    assert!(refills.try_recv().is_err(), "a spare nobody took was replaced");
    // Made while its image mount went: listed all the same, and released with the others.
    d.mounts.lock().unwrap().clear();
    let late = spare_folder(&d);
    d.publish(&late, &r);
    assert!(d.is_spare(&r.key, &late), "a spare of a gone image mount was lost track of");
    d.prepared(&late, r.clone());
    assert!(refills.try_recv().is_err(), "a spare was asked for a gone image mount");
    d.reap_spares();
    assert!(!late.exists() && !next.exists(), "the spares of a gone image mount stayed");
    assert!(d.spares.lock().unwrap().is_empty());
}

#[test]
fn a_stopping_daemon_makes_no_spare_and_releases_all() {
    // Regression: a spare the `hb-spares` thread finished while the daemon stopped was
    // listed after the daemon released its spares, and stayed mounted.
    let tmp = tempfile::tempdir().unwrap();
    let (d, _refills, r) = daemon(tmp.path());
    let dir = spare_folder(&d);
    d.publish(&dir, &r);
    d.prepared(&dir, r.clone());
    // A preparation under way holds the stop back until it is done.
    let held = d.stopping.lock().unwrap();
    std::thread::scope(|s| {
        let stopping = spawn_until_blocked(s, || d.stop_spares());
        assert!(dir.exists(), "spares released while one was being prepared");
        drop(held);
        stopping.join().unwrap();
    });
    assert!(!dir.exists() && d.spares.lock().unwrap().is_empty(), "a spare outlived the daemon");
    // Asked for after the stop: nothing is made.
    d.refill(r.clone());
    d.prepare_spare(r.clone());
    let left: Vec<_> = std::fs::read_dir(crate::container::containers_dir(&d.root))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "a spare was made after the stop: {left:?}");
    assert!(d.refilling.lock().unwrap().is_empty());
}

/// A lazy layer of one file, one chunk, recorded in `d`'s store.
fn record_lazy_layer(d: &Daemon, tag: &str) {
    use hb_core::*;
    let bytes = format!("the bytes of {tag}");
    let id = ChunkId::of(bytes.as_bytes());
    let mut b = TreeBuilder::new(ChunkerParams::default());
    let meta = Meta { mode: 0o644, uid: 0, gid: 0, mtime: 1, mtime_nsec: 0, xattrs: vec![] };
    let chunks = vec![ChunkRef { id, len: bytes.len() as u32 }];
    b.add(b"f", meta, NewEntry::File { chunks }).unwrap();
    let index = b.finish(Digest::of(tag.as_bytes()));
    let mut table = ChunkTable::default();
    table.push(id, bytes.len() as u32, bytes.len() as u32, false);
    let source = LazySource { repository: "127.0.0.1:1/x".into(), data: Digest::of(b"data"), table };
    let blob = Digest::of(format!("blob {tag}").as_bytes());
    d.store.import_lazy_layer(&index, &blob, hb_store::BlobCompression::None, 1, &source, false).unwrap();
}

/// Regression (hosts pulling one image at once, big-binary in `hb-bench peers --pulls`: 1.7-1.9x
/// the registry bytes of one copy): a host asked for chunks as their owner while its own pull's
/// index was still on the way answered without them, and every asker fetched them itself. A
/// fetch for peers now waits for a preparation that has recorded no layer yet, and only for it.
#[test]
fn fetches_for_peers_wait_for_a_preparation_to_record_its_layers_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _refills, _) = daemon(dir.path());
    // No preparation under way: nothing to wait for.
    let t = Instant::now();
    assert!(!d.await_learning());
    assert!(t.elapsed() < Duration::from_millis(500), "waited {:?} with nothing under way", t.elapsed());

    // A preparation that records its layers while the fetch waits: the fetch looks again.
    std::thread::scope(|s| {
        let prep = d.prepare();
        let waiter = s.spawn(|| d.await_learning());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the fetch did not wait for the preparation under way");
        record_lazy_layer(&d, "one");
        record_lazy_layer(&d, "two");
        assert!(waiter.join().unwrap(), "the layers the preparation recorded went unseen");
        // Once it has recorded them, later fetches do not wait: it knows what it will know.
        let t = Instant::now();
        assert!(!d.await_learning());
        assert!(t.elapsed() < Duration::from_millis(500), "waited {:?} after the layers were in", t.elapsed());
        drop(prep);
    });

    // A preparation that ends without recording anything (its image was present) frees the
    // waiter at once, as does the bound on one that never records.
    std::thread::scope(|s| {
        let prep = d.prepare();
        let waiter = s.spawn(|| d.await_learning());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished());
        drop(prep);
        assert!(!waiter.join().unwrap(), "nothing was recorded");
    });
    let prep = d.prepare();
    assert!(!d.await_learning(), "a preparation that records nothing is waited for within its bound");
    // One known to record nothing (its image is present) is not waited for at all.
    prep.nothing_to_learn();
    let t = Instant::now();
    assert!(!d.await_learning());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "waited {:?} for a preparation with nothing to learn",
        t.elapsed()
    );
}

/// A fetch for peers looks again when layers were recorded while it ran, even with no
/// preparation under way to wait for (its sources were those known when it began); and at most
/// `LEARN_WAITERS` fetches wait for a preparation at once (each holds a serving turn).
#[test]
fn a_fetch_looks_again_after_layers_recorded_meanwhile_and_few_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _refills, _) = daemon(dir.path());
    let before = d.store.lazy_imports();
    assert!(!d.look_again(before), "nothing recorded, nothing under way");
    record_lazy_layer(&d, "meanwhile");
    assert!(d.look_again(before), "a layer recorded while the fetch ran went unseen");

    let prep = d.prepare();
    std::thread::scope(|s| {
        let waiters: Vec<_> = (0..store_api::LEARN_WAITERS).map(|_| s.spawn(|| d.await_learning())).collect();
        let t = Instant::now();
        while d.learn_waiters.load(Ordering::SeqCst) < store_api::LEARN_WAITERS {
            assert!(t.elapsed() < Duration::from_secs(5), "the waiters never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        assert!(!d.await_learning(), "one more than the cap waited");
        assert!(t.elapsed() < Duration::from_millis(500), "one more than the cap waited {:?}", t.elapsed());
        record_lazy_layer(&d, "learned");
        assert!(waiters.into_iter().all(|w| w.join().unwrap()), "a waiter missed the layers recorded");
    });
    drop(prep);
    assert_eq!(d.learn_waiters.load(Ordering::SeqCst), 0);
}
