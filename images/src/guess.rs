//! The start-up set of an image that has no recorded order: what its command's loader will map
//! before the program runs. The command (the image config's entrypoint and cmd) is found on the
//! image's `PATH`, and so is the first word after it (a wrapper's program: `tini -- node`,
//! `docker-entrypoint.sh postgres`) and the commands of a `sh -c` script; a script's `#!`
//! interpreter follows; an ELF program brings its interpreter (`PT_INTERP`) and its libraries
//! (`DT_NEEDED`, found as the loader finds them: `LD_LIBRARY_PATH`, `DT_RUNPATH`, then the
//! system's folders), recursively; files the command line names come whole. Small files are fetched whole, a big program as far as its loaded
//! segments reach. Nothing here knows an image or a command: it is how any program starts.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hb_core::elf::{self, ElfHeaders};

use hb_core::{ChunkId, Kind, LayerIndex, Meta};
use hb_fuse::{Fetcher, StartupGuess};
use hb_runtime::{ImageConfig, RunOptions};

/// Files up to this size are fetched whole (the size a first touch fetches whole anyway).
const WHOLE_FILE: u64 = 4 << 20;
/// Bytes read to parse a program's headers.
const HEAD: usize = 4096;
/// Programs and libraries followed, at most.
const MAX_FILES: usize = 64;
/// Levels of interpreters and libraries followed.
const MAX_DEPTH: usize = 6;
/// Most bytes (uncompressed) the guess fetches.
const MAX_BYTES: u64 = 256 << 20;

/// What a container will run, from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Command {
    pub argv: Vec<String>,
    /// The `PATH` the command is looked up on.
    pub path: Vec<String>,
    /// `LD_LIBRARY_PATH`: searched for libraries before a program's own search path.
    pub library_path: Vec<String>,
    pub workdir: String,
}

impl Command {
    /// What a container of `image` runs with `run`'s options (`--entrypoint`, arguments, `-w`,
    /// `-e`; none: the image's own command), by the runtime's rules, with its `PATH` and working
    /// folder; `None` when there is nothing to run.
    pub fn of_run(image: &ImageConfig, run: &RunOptions) -> Option<Command> {
        let argv = hb_runtime::process_args(image, run).ok()?;
        // The image's environment, then `-e`: the last setting of a variable wins.
        let env: Vec<&String> = image.env.iter().chain(&run.env).collect();
        let var =
            |name: &str| env.iter().rev().find_map(|e| e.strip_prefix(name)?.strip_prefix('=').map(str::to_string));
        let split = |v: String| v.split(':').filter(|p| !p.is_empty()).map(str::to_string).collect();
        let workdir = run.workdir.clone().or_else(|| image.working_dir.clone()).filter(|w| !w.is_empty());
        Some(Command {
            argv,
            path: split(var("PATH").unwrap_or_else(|| hb_runtime::DEFAULT_PATH.to_string())),
            library_path: var("LD_LIBRARY_PATH").map(split).unwrap_or_default(),
            workdir: workdir.unwrap_or_else(|| "/".into()),
        })
    }
}

/// The guess for one mount: the merged tree and the command.
pub struct EntryGuess {
    tree: Arc<LayerIndex>,
    command: Command,
}

impl EntryGuess {
    pub fn new(tree: Arc<LayerIndex>, command: Command) -> EntryGuess {
        EntryGuess { tree, command }
    }

    /// The entry of `name` as `execvp` finds it: a path with a slash as it is (relative to the
    /// working folder), else the first executable file of that name on `PATH`.
    fn find_program(&self, name: &str) -> Option<u32> {
        let executable = |i: &u32| self.meta(*i).mode & 0o111 != 0;
        if name.contains('/') {
            return self.regular(&join(&self.command.workdir, name)).filter(executable);
        }
        self.command.path.iter().find_map(|dir| self.regular(&join(dir, name)).filter(executable))
    }

    fn meta(&self, i: u32) -> &Meta {
        &self.tree.entries[i as usize].meta
    }

    /// The regular file at `path` (links followed).
    fn regular(&self, path: &str) -> Option<u32> {
        let i = self.tree.resolve(path.as_bytes())?;
        matches!(self.tree.entries[i as usize].kind, Kind::File { .. }).then_some(i)
    }

    fn size(&self, i: u32) -> u64 {
        match self.tree.entries[i as usize].kind {
            Kind::File { size, .. } => size,
            _ => 0,
        }
    }

    /// The chunks of file `i` that cover its bytes `[0, end)`.
    fn chunks_to(&self, i: u32, end: u64) -> Vec<ChunkId> {
        let mut at = 0u64;
        let mut out = Vec::new();
        for c in self.tree.file_chunks(i) {
            if at >= end {
                break;
            }
            out.push(c.id);
            at += u64::from(c.len);
        }
        out
    }

    /// Reads `len` bytes at `offset` of file `i` through the fetcher (fewer at its end).
    fn read(&self, f: &Fetcher, i: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?.min(self.size(i));
        let mut out = Vec::with_capacity(len);
        let mut at = 0u64;
        for c in self.tree.file_chunks(i) {
            let next = at + u64::from(c.len);
            if next > offset && at < end {
                let data = f.read_unrecorded(&c.id).ok()?;
                let from = offset.saturating_sub(at) as usize;
                let to = (end.min(next) - at) as usize;
                out.extend_from_slice(data.get(from..to)?);
            }
            if next >= end {
                break;
            }
            at = next;
        }
        Some(out)
    }

    /// Library `name` as the loader finds it for program `from` (headers `h`).
    fn find_library(&self, name: &[u8], search: &[Vec<u8>], from: u32, h: &ElfHeaders) -> Option<u32> {
        let name = std::str::from_utf8(name).ok()?;
        if name.contains('/') {
            return self.regular(name);
        }
        let origin = String::from_utf8_lossy(&self.tree.path(self.tree.entries[from as usize].parent)).into_owned();
        let origin = format!("/{origin}");
        let mut dirs: Vec<String> = self.command.library_path.clone();
        dirs.extend(
            search.iter().map(|d| String::from_utf8_lossy(d).replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)),
        );
        if let Some(t) = elf::multiarch(h) {
            dirs.push(format!("/lib/{t}"));
            dirs.push(format!("/usr/lib/{t}"));
        }
        if h.class64 {
            dirs.extend(["/lib64".into(), "/usr/lib64".into()]);
        }
        dirs.extend(["/lib".into(), "/usr/lib".into(), "/usr/local/lib".into()]);
        dirs.iter().find_map(|d| self.regular(&join(d, name)))
    }

    /// Fetches file `i` (whole, or a big program as far as its segments reach) and returns the
    /// files it leads to: a script's interpreter, a program's loader and libraries.
    fn visit(&self, f: &Fetcher, i: u32, fetch: &(dyn Fn(&[ChunkId]) + Sync), budget: &Mutex<u64>) -> Vec<u32> {
        let size = self.size(i);
        let take = |end: u64| self.take(i, end, fetch, budget);
        // The head first (one round trip; the set's files at once), so what the file leads to is
        // known before its bulk arrives.
        let Some(head) = self.read(f, i, 0, HEAD) else { return Vec::new() };
        if let Some(script) = head.strip_prefix(b"#!") {
            take(size.min(WHOLE_FILE));
            return self.interpreter_of_script(script);
        }
        let Ok(h) = ElfHeaders::parse(&head, size) else {
            take(if size <= WHOLE_FILE { size } else { 0 });
            return Vec::new();
        };
        let mut read = |o: u64, n: usize| self.read(f, i, o, n);
        let (interp, dynamic) = (h.interpreter(&mut read), h.dynamic(&mut read));
        take(if size <= WHOLE_FILE { size } else { h.loaded_end });
        let mut next = Vec::new();
        if let Ok(Some(p)) = interp {
            next.extend(std::str::from_utf8(&p).ok().and_then(|p| self.regular(p)));
        }
        match dynamic {
            Ok(d) => next.extend(d.needed.iter().filter_map(|n| self.find_library(n, &d.search, i, &h))),
            Err(e) => {
                tracing::debug!(file = %String::from_utf8_lossy(&self.tree.path(i)), error = %e, "no libraries read")
            }
        }
        next
    }

    /// Hands the chunks of file `i`'s bytes `[0, end)` to `fetch`, within what `budget` has left.
    fn take(&self, i: u32, end: u64, fetch: &(dyn Fn(&[ChunkId]) + Sync), budget: &Mutex<u64>) {
        let mut left = budget.lock().expect("budget lock");
        let end = end.min(*left);
        *left -= end;
        drop(left);
        if end > 0 {
            fetch(&self.chunks_to(i, end));
        }
    }

    /// The interpreter a `#!` line names (`/usr/bin/env NAME` looks NAME up on `PATH`).
    fn interpreter_of_script(&self, line: &[u8]) -> Vec<u32> {
        let line = line.split(|&c| c == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let Some(interp) = words.next() else { return Vec::new() };
        let mut out: Vec<u32> = self.regular(interp).into_iter().collect();
        if interp.rsplit('/').next() == Some("env") {
            out.extend(words.find(|w| !w.starts_with('-')).and_then(|w| self.find_program(w)));
        }
        out
    }
}

impl StartupGuess for EntryGuess {
    fn guess(&self, f: &Fetcher, fetch: &(dyn Fn(&[ChunkId]) + Sync), stop: &AtomicBool) {
        let argv = &self.command.argv;
        let Some(program) = argv.first().and_then(|p| self.find_program(p)) else {
            tracing::debug!(command = ?argv, "the command is not in the image; nothing guessed");
            return;
        };
        let budget = &Mutex::new(MAX_BYTES);
        let mut seen: HashSet<u32> = HashSet::from([program]);
        let mut level = vec![program];
        // A wrapper's program (`tini -- node`, `env python3`, `docker-entrypoint.sh postgres`):
        // the first word after the command that is a program on `PATH`; a shell's `-c` script
        // (docker's shell form of CMD): the programs it runs, in order.
        // (Of the first three words that are neither options nor assignments: `env X=1 node`,
        // `gosu app node`, `tini -- /app/server`.)
        let wrapped = argv[1..]
            .iter()
            .filter(|a| !a.starts_with('-') && !a.contains('='))
            .take(3)
            .find_map(|a| self.find_program(a))
            .filter(|i| seen.insert(*i));
        level.extend(wrapped);
        for name in shell_script(argv).map(programs_of_script).unwrap_or_default() {
            if let Some(i) = self.find_program(&name).filter(|i| seen.insert(*i)) {
                level.push(i);
            }
        }
        // Files the command line names (a script given to an interpreter), whole when small.
        let args: Vec<u32> = argv[1..]
            .iter()
            .filter_map(|a| self.regular(&join(&self.command.workdir, a)))
            .filter(|&i| self.size(i) <= WHOLE_FILE && seen.insert(i))
            .take(MAX_FILES / 2)
            .collect();
        level.truncate(MAX_FILES - args.len());
        let mut visited = 0;
        for depth in 0..MAX_DEPTH {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            visited += level.len();
            // One level at a time, its files at once (each costs a few round trips).
            let found: Vec<Vec<u32>> = std::thread::scope(|s| {
                let handles: Vec<_> = level.iter().map(|&i| s.spawn(move || self.visit(f, i, fetch, budget))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
            });
            if depth == 0 {
                for &a in &args {
                    self.take(a, self.size(a), fetch, budget);
                }
            }
            level = found.into_iter().flatten().filter(|i| seen.insert(*i)).collect();
            level.truncate(MAX_FILES.saturating_sub(visited));
            if level.is_empty() {
                break;
            }
        }
        let program = String::from_utf8_lossy(&self.tree.path(program)).into_owned();
        tracing::debug!(%program, files = visited + args.len(), "start-up set guessed from the command");
    }
}

/// The script of `sh -c SCRIPT ...` (any shell named `sh`, `bash`, `dash`, `ash` or `zsh`).
fn shell_script(argv: &[String]) -> Option<&str> {
    let shell = argv.first()?.rsplit('/').next()?;
    if !matches!(shell, "sh" | "bash" | "dash" | "ash" | "zsh") {
        return None;
    }
    let c = argv.iter().skip(1).position(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('c'))?;
    argv.get(c + 2).map(String::as_str)
}

/// The programs a shell script's simple commands run, first word of each (after variable
/// assignments, redirections and `exec`/`then`/`do`-like words), without duplicates; at most 16.
fn programs_of_script(script: &str) -> Vec<String> {
    const SKIP: &[&str] = &[
        "exec", "then", "do", "else", "if", "while", "until", "!", "{", "time", "command", "nohup", "fi", "done",
        "esac", "}",
    ];
    let mut out: Vec<String> = Vec::new();
    let separated = ["&&", "||", ";", "|", "&", "\n", "(", ")", "`", "$("]
        .iter()
        .fold(script.to_string(), |s, sep| s.replace(sep, "\n"));
    for segment in separated.split('\n') {
        let mut words = segment.split_whitespace().map(|w| w.trim_matches(|c| c == '\'' || c == '"'));
        let first = words.find(|w| {
            let assignment = w.find('=').is_some_and(|p| p > 0);
            let redirect = w.trim_start_matches(|c: char| c.is_ascii_digit()).starts_with(['>', '<']);
            !w.is_empty() && !SKIP.contains(w) && !assignment && !redirect
        });
        if let Some(w) = first.filter(|w| !w.starts_with('$') && !out.iter().any(|o| o == w)) {
            out.push(w.to_string());
        }
        if out.len() >= 16 {
            break;
        }
    }
    out
}

/// `name` relative to folder `dir` (an absolute `name` as it is).
fn join(dir: &str, name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_scripts_programs_are_its_commands_first_words() {
        let argv: Vec<String> =
            ["/bin/sh", "-c", "X=1 printf 'x' > /tmp/a.c && gcc -O2 -c /tmp/a.c; exec perl -e 1 | tee 2>/dev/null"]
                .map(String::from)
                .to_vec();
        let s = shell_script(&argv).unwrap();
        assert_eq!(programs_of_script(s), ["printf", "gcc", "perl", "tee"]);
        assert_eq!(shell_script(&["python3".into(), "-c".into(), "print(1)".into()]), None, "not a shell");
        assert_eq!(shell_script(&["sh".into(), "/entry.sh".into()]), None, "a script file, not -c");
        assert_eq!(programs_of_script("if true; then echo; fi"), ["true", "echo"]);
    }

    /// The command a container of image config `config` runs with `run`'s options.
    pub(super) fn of_config(config: &str, run: Option<&RunOptions>) -> Option<Command> {
        Command::of_run(&ImageConfig::from_json(config.as_bytes()).ok()?, run.unwrap_or(&RunOptions::default()))
    }

    #[test]
    fn the_command_comes_from_the_config_with_its_path() {
        let c = of_config(r#"{"config":{"Entrypoint":["/init"],"Cmd":["serve"],"Env":["A=1","PATH=/opt/bin:/bin"],"WorkingDir":"/srv"}}"#, None).unwrap();
        assert_eq!(c.argv, ["/init", "serve"]);
        assert_eq!(c.path, ["/opt/bin", "/bin"]);
        assert_eq!(c.workdir, "/srv");
        let d = of_config(r#"{"config":{"Cmd":["sh"]}}"#, None).unwrap();
        assert_eq!((d.path.len(), d.workdir.as_str()), (6, "/"), "docker's PATH and folder when the image sets none");
        assert_eq!(of_config(r#"{"config":{}}"#, None), None);
        assert_eq!(of_config("not json", None), None);
        // `hb run`'s command, by docker's rules.
        let cfg = r#"{"config":{"Entrypoint":["/init"],"Cmd":["serve"]}}"#;
        let over = |e: Option<&str>, c: &[&str]| RunOptions {
            entrypoint: e.map(String::from),
            cmd: c.iter().map(|s| s.to_string()).collect(),
            ..RunOptions::default()
        };
        assert_eq!(
            of_config(cfg, Some(&over(None, &["sh"]))).unwrap().argv,
            ["/init", "sh"],
            "arguments replace the cmd"
        );
        assert_eq!(of_config(cfg, Some(&over(Some("sh"), &[]))).unwrap().argv, ["sh"], "an entrypoint drops the cmd");
        assert_eq!(of_config(cfg, Some(&over(Some("sh"), &["-c", "x"]))).unwrap().argv, ["sh", "-c", "x"]);
        assert_eq!(of_config(cfg, Some(&over(Some(""), &[]))), None, "an empty entrypoint: nothing");
        // `-w` and `-e`: the working folder and a later PATH win.
        let o = RunOptions { workdir: Some("/w".into()), env: vec!["PATH=/x".into()], ..over(None, &[]) };
        let c = of_config(r#"{"config":{"Cmd":["a"],"Env":["PATH=/bin"],"WorkingDir":"/srv"}}"#, Some(&o)).unwrap();
        assert_eq!((c.path, c.workdir.as_str()), (vec!["/x".to_string()], "/w"));
    }
}

#[cfg(test)]
mod tree_tests {
    use super::*;
    use hb_core::tree::{NewEntry, TreeBuilder};
    use hb_core::{ChunkRef, ChunkerParams, Digest};

    fn guess(command: Command) -> EntryGuess {
        let mut b = TreeBuilder::new(ChunkerParams::default());
        let file = |n: u8| NewEntry::File { chunks: vec![ChunkRef { id: ChunkId::of(&[n]), len: 1 }] };
        let (x, r) = (Meta { mode: 0o755, ..Meta::default() }, Meta { mode: 0o644, ..Meta::default() });
        b.add(b"usr/bin/python3.11", x.clone(), file(1)).unwrap();
        b.add(b"usr/bin/python3", x.clone(), NewEntry::Symlink { target: b"python3.11".to_vec() }).unwrap();
        b.add(b"usr/bin/env", x.clone(), file(2)).unwrap();
        b.add(b"usr/bin/notes", r.clone(), file(3)).unwrap();
        b.add(b"bin", x.clone(), NewEntry::Symlink { target: b"usr/bin".to_vec() }).unwrap();
        b.add(b"usr/lib/x86_64-linux-gnu/libc.so.6", r.clone(), file(4)).unwrap();
        b.add(b"lib/libc.musl-x86_64.so.1", r.clone(), file(5)).unwrap();
        b.add(b"opt/tool/bin/tool", x.clone(), file(6)).unwrap();
        b.add(b"opt/tool/lib/libtool.so", r.clone(), file(7)).unwrap();
        b.add(b"opt/extra/libextra.so", r.clone(), file(8)).unwrap();
        b.add(b"srv/run.sh", x.clone(), file(9)).unwrap();
        EntryGuess::new(Arc::new(b.finish(Digest::of(b""))), command)
    }

    fn at(g: &EntryGuess, path: &str) -> Option<u32> {
        g.tree.lookup(path.as_bytes())
    }

    /// An x86-64 ELF header with no program headers.
    fn x86_64() -> ElfHeaders {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        (h[4], h[5]) = (2, 1);
        h[18..20].copy_from_slice(&62u16.to_le_bytes());
        ElfHeaders::parse(&h, 64).unwrap()
    }

    #[test]
    fn programs_scripts_and_libraries_are_found_as_exec_and_the_loader_find_them() {
        let c = super::tests::of_config(
            r#"{"config":{"Cmd":["python3"],"Env":["PATH=/nowhere","PATH=/usr/local/bin:/bin","LD_LIBRARY_PATH=/opt/extra"],"WorkingDir":"/srv"}}"#,
            None,
        )
        .unwrap();
        let g = guess(c);
        // On PATH (the last PATH set wins), through links; only executables.
        assert_eq!(g.find_program("python3"), at(&g, "usr/bin/python3.11"));
        assert_eq!(g.find_program("notes"), None, "not executable");
        assert_eq!(g.find_program("missing"), None);
        // A path with a slash, relative to the working folder.
        assert_eq!(g.find_program("./run.sh"), at(&g, "srv/run.sh"));
        // `#!/usr/bin/env NAME`: env, and NAME on PATH.
        let s = g.interpreter_of_script(b"/usr/bin/env -S python3 -u\nprint(1)\n");
        assert_eq!(s, [at(&g, "usr/bin/env").unwrap(), at(&g, "usr/bin/python3.11").unwrap()]);
        // Libraries: the multiarch folder; musl's /lib; $ORIGIN; LD_LIBRARY_PATH.
        let (h, py, tool) = (x86_64(), at(&g, "usr/bin/python3.11").unwrap(), at(&g, "opt/tool/bin/tool").unwrap());
        assert_eq!(g.find_library(b"libc.so.6", &[], py, &h), at(&g, "usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(g.find_library(b"libc.musl-x86_64.so.1", &[], py, &h), at(&g, "lib/libc.musl-x86_64.so.1"));
        assert_eq!(
            g.find_library(b"libtool.so", &[b"$ORIGIN/../lib".to_vec()], tool, &h),
            at(&g, "opt/tool/lib/libtool.so")
        );
        assert_eq!(g.find_library(b"libtool.so", &[], tool, &h), None, "not without its search path");
        assert_eq!(g.find_library(b"libextra.so", &[], py, &h), at(&g, "opt/extra/libextra.so"));
    }
}
