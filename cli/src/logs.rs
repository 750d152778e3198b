//! Containers' output in docker's json-file format: one `{"log","stream","time"}` object per line
//! in `<container>/log.json`, rotated as `--log-opt max-size/max-file` say (`log.json.1`, ...).
//! The monitor writes it ([`Stream`] copies the runtime's stdout and stderr line by line through a
//! [`LogWriter`]); `hb logs` reads it back ([`logs`]: the rotated files first, following across a
//! rotation).

use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::container::State;

/// One line of `log.json`.
#[derive(Serialize, Deserialize)]
pub struct LogLine {
    pub log: String,
    pub stream: String,
    pub time: String,
}

/// `--log-opt`: rotation of `log.json`, as docker's json-file driver (`max-size`, `max-file`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOptions {
    /// Rotate when the log would pass this many bytes [default: never].
    pub max_size: Option<u64>,
    /// Files kept, the current one included (`log.json`, `log.json.1`, ...) [default: 1].
    pub max_file: Option<u32>,
}

impl LogOptions {
    pub fn parse(opts: &[String]) -> anyhow::Result<LogOptions> {
        let mut o = LogOptions::default();
        for opt in opts {
            match opt.split_once('=') {
                Some(("max-size", v)) => match hb_core::parse_size(v) {
                    Ok(n) if n > 0 => o.max_size = Some(n),
                    _ => bail!("--log-opt {opt}: a size such as 10m or 1g"),
                },
                Some(("max-file", v)) => match v.parse::<u32>() {
                    Ok(n) if n > 0 => o.max_file = Some(n),
                    _ => bail!("--log-opt {opt}: a number of files, at least 1"),
                },
                _ => bail!("--log-opt {opt:?}: hb's json-file log takes max-size=SIZE and max-file=N"),
            }
        }
        if o.max_file.is_some() && o.max_size.is_none() {
            bail!("--log-opt max-file needs max-size (the size at which the log rotates)");
        }
        Ok(o)
    }
}

/// `log.json` rotated to `log.json.1` (then `.2`, ...): the older, the higher.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// Writes `log.json`, rotating it as [`LogOptions`] say.
pub struct LogWriter {
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    opts: LogOptions,
}

impl LogWriter {
    pub fn open(path: &Path, opts: LogOptions) -> std::io::Result<LogWriter> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { file, path: path.to_path_buf(), size, opts })
    }

    /// A writer over an open file (tests: one opened read-only fails every write).
    #[cfg(test)]
    pub(crate) fn over(file: std::fs::File, path: &Path) -> LogWriter {
        LogWriter { file, path: path.to_path_buf(), size: 0, opts: LogOptions::default() }
    }

    /// Appends one record (a whole line), rotating first when it would pass `max-size`.
    pub fn write_line(&mut self, text: &[u8]) -> std::io::Result<()> {
        if let Some(max) = self.opts.max_size {
            if self.size > 0 && self.size + text.len() as u64 > max {
                self.rotate()?;
            }
        }
        self.file.write_all(text)?;
        self.size += text.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.opts.max_file.unwrap_or(1).saturating_sub(1);
        if keep == 0 {
            // One file: it starts again (as docker's max-file=1).
            self.file.set_len(0)?;
        } else {
            for n in (1..keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// What `hb logs` prints.
#[derive(Default)]
pub struct LogFilter {
    pub follow: bool,
    /// Only the last N lines (of those since `since`).
    pub tail: Option<usize>,
    pub timestamps: bool,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `--since`: RFC 3339, Unix seconds (fractions allowed), or a duration before now (`1h30m`,
/// `10m`, `42s`, `500ms`), as docker takes it.
pub fn parse_since(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, Utc};
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // Without a zone (taken as UTC): `2026-12-06T10:00:00`, `2026-12-06`.
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Ok(t.and_utc());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if let Some(t) = DateTime::from_timestamp(secs.trunc() as i64, (secs.fract() * 1e9) as u32) {
            return Ok(t);
        }
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let unit_len = rest[digits..].find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len() - digits);
        let (num, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let n: f64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("--since {s:?}: RFC 3339, Unix seconds, or a duration such as 10m"))?;
        total += n * match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!("--since {s:?}: RFC 3339, Unix seconds, or a duration such as 10m (units ms, s, m, h)"),
        };
        rest = &rest[digits + unit_len..];
    }
    if s.is_empty() {
        bail!("--since needs a time");
    }
    Ok(Utc::now() - chrono::Duration::milliseconds((total * 1000.0) as i64))
}

/// `hb logs`: the container's output, stdout lines to stdout and stderr lines to stderr, the
/// rotated files first.
pub fn logs(dir: &Path, s: &State, f: &LogFilter) -> anyhow::Result<()> {
    let path = dir.join("log.json");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && s.handed_over => bail!(
            "container {} keeps no log: `hb run --rm` in the foreground passes the output straight through (run it with -d, or without --rm, to keep one)",
            s.name
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("container {} keeps no log (it ran in the foreground on a terminal)", s.name)
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    // A line read once: parsed and judged by `--since` here (a line that is no record is skipped).
    let record = |line: &str| {
        serde_json::from_str::<LogLine>(line).ok().filter(|l| {
            f.since.is_none_or(|since| chrono::DateTime::parse_from_rfc3339(&l.time).is_ok_and(|t| t >= since))
        })
    };
    let mut emit = |l: &LogLine| -> anyhow::Result<()> {
        let w: &mut dyn Write = if l.stream == "stderr" { &mut err } else { &mut out };
        if f.timestamps {
            write!(w, "{} ", l.time)?;
        }
        w.write_all(l.log.as_bytes())?;
        w.flush()?;
        Ok(())
    };
    // Rotated files, oldest first; then the current one (followed when asked). A rotation since
    // the current file was opened made it `log.json.1`: read once, through the open handle.
    let inode = |m: &std::fs::Metadata| std::os::unix::fs::MetadataExt::ino(m);
    let current_ino = file.metadata().as_ref().map(inode).ok();
    let mut older = Vec::new();
    for n in 1.. {
        let Ok(mut f) = std::fs::File::open(rotated(&path, n)) else { break };
        if f.metadata().as_ref().map(inode).ok() == current_ino {
            continue;
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text)?;
        older.push(text);
    }
    let mut reader = std::io::BufReader::new(file);
    let mut current = String::new();
    std::io::Read::read_to_string(&mut reader, &mut current)?;
    let mut lines: Vec<&str> = older.iter().rev().chain([&current]).flat_map(|t| t.lines()).collect();
    // A line being written (no newline yet) is read again whole next time round.
    let partial =
        if current.ends_with('\n') || current.is_empty() { 0 } else { current.lines().last().map_or(0, str::len) };
    if partial > 0 {
        lines.pop();
        reader.seek_relative(-(partial as i64))?;
    }
    let records: Vec<LogLine> = lines.into_iter().filter_map(record).collect();
    let skip = f.tail.map_or(0, |n| records.len().saturating_sub(n));
    for l in &records[skip..] {
        emit(l)?;
    }
    if !f.follow {
        return Ok(());
    }
    let mut buf = String::new();
    // Following: once the container has ended, one more pass reads what it wrote last (its
    // monitor records the end only after the output is in the log).
    let mut last_pass = false;
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf)?;
        if n > 0 && buf.ends_with('\n') {
            if let Some(l) = record(buf.trim_end_matches('\n')) {
                emit(&l)?;
            }
            continue;
        }
        if n > 0 {
            // A line being written: read the rest of it next time round.
            reader.seek_relative(-(n as i64))?;
        }
        // Rotated away (a new log.json) or started again (max-file=1): read on from its start.
        let ours = reader.get_ref().metadata()?;
        match std::fs::metadata(&path) {
            Ok(m) if inode(&m) != inode(&ours) => {
                // What was written to the old file before it was renamed comes first.
                let mut rest = String::new();
                std::io::Read::read_to_string(&mut reader, &mut rest)?;
                for l in rest.lines().filter_map(record) {
                    emit(&l)?;
                }
                reader = std::io::BufReader::new(std::fs::File::open(&path)?);
                continue;
            }
            _ if ours.len() < reader.stream_position()? => {
                reader.seek(std::io::SeekFrom::Start(0))?;
                continue;
            }
            _ => {}
        }
        if last_pass {
            return Ok(());
        }
        if !State::load(dir).is_ok_and(|s| s.is_running()) {
            last_pass = true;
            continue;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// RFC 3339 with nanoseconds, UTC, as docker's json-file log writes it.
pub fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// One output stream of the container: copied line by line into `log.json` (and, in the
/// foreground, to hb's own stream). Docker splits long lines at 16 KiB; so does this.
pub(crate) struct Stream {
    pub(crate) fd: std::os::fd::OwnedFd,
    name: &'static str,
    pending: Vec<u8>,
    /// Lines `log.json` did not take (a full disk ...), and the first reason.
    log_errors: u64,
    first_log_error: Option<std::io::Error>,
}

impl Stream {
    const MAX_LINE: usize = 16 << 10;

    pub(crate) fn new(fd: std::os::fd::OwnedFd, name: &'static str) -> Self {
        Stream { fd, name, pending: Vec::new(), log_errors: 0, first_log_error: None }
    }

    /// Reads what is there and writes the complete lines; false at the end of the stream (the
    /// rest written as a last line).
    pub(crate) fn pump(&mut self, log: &mut LogWriter, echo: bool) -> bool {
        let mut buf = [0u8; 64 << 10];
        let n = match rustix::io::read(&self.fd, &mut buf) {
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => return true,
            Err(_) | Ok(0) => 0,
            Ok(n) => n,
        };
        self.pending.extend_from_slice(&buf[..n]);
        loop {
            let cut = match self.pending.iter().position(|b| *b == b'\n') {
                Some(i) if i < Self::MAX_LINE => i + 1,
                _ if self.pending.len() >= Self::MAX_LINE => Self::MAX_LINE,
                _ if n == 0 && !self.pending.is_empty() => self.pending.len(),
                _ => break,
            };
            let line: Vec<u8> = self.pending.drain(..cut).collect();
            self.write(&line, log, echo);
        }
        n > 0
    }

    fn write(&mut self, line: &[u8], log: &mut LogWriter, echo: bool) {
        if echo {
            let _ = if self.name == "stderr" {
                std::io::stderr().lock().write_all(line)
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(line).and_then(|_| o.flush())
            };
        }
        let rec =
            LogLine { log: String::from_utf8_lossy(line).into_owned(), stream: self.name.into(), time: timestamp() };
        let mut text = serde_json::to_vec(&rec).expect("a log line serialises");
        text.push(b'\n');
        if let Err(e) = log.write_line(&text) {
            self.log_errors += 1;
            self.first_log_error.get_or_insert(e);
        }
    }

    /// Says how many lines of this stream `log.json` did not take, if any.
    pub(crate) fn report(&self, log: &Path) {
        if let Some(e) = &self.first_log_error {
            tracing::warn!(
                "{} lines of the container's {} could not be written to {} (first: {e}); `hb logs` lacks them",
                self.log_errors,
                self.name,
                log.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_as_dockers_json_file_driver() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let opts = LogOptions::parse(&["max-size=10".into(), "max-file=3".into()]).unwrap();
        let mut w = LogWriter::open(&path, opts).unwrap();
        for i in 0..5 {
            w.write_line(format!("line {i}\n").as_bytes()).unwrap();
        }
        let read = |n: u32| std::fs::read_to_string(if n == 0 { path.clone() } else { rotated(&path, n) }).ok();
        assert_eq!(
            (read(0), read(1), read(2), read(3)),
            (Some("line 4\n".into()), Some("line 3\n".into()), Some("line 2\n".into()), None)
        );
        let mut one = LogWriter::open(&path, LogOptions::parse(&["max-size=10".into()]).unwrap()).unwrap();
        one.write_line(b"again\n").unwrap();
        assert_eq!(read(0).as_deref(), Some("again\n"), "max-file 1: the file starts again");
        for bad in ["max-size=0", "max-file=0", "max-size=lots", "mode=fast"] {
            assert!(LogOptions::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(LogOptions::parse(&["max-file=2".into()]).is_err(), "max-file without max-size");
    }

    #[test]
    fn since_takes_times_timestamps_and_durations() {
        let t = parse_since("2026-12-06T10:00:00Z").unwrap();
        assert_eq!(t.timestamp(), 1796551200);
        assert_eq!(parse_since("1796551200").unwrap(), t);
        assert_eq!(parse_since("2026-12-06T10:00:00").unwrap(), t, "no zone: UTC");
        assert_eq!(parse_since("2026-12-06").unwrap().timestamp(), 1796515200);
        let ago = chrono::Utc::now() - parse_since("1h30m").unwrap();
        assert!((ago.num_seconds() - 5400).abs() < 5, "{ago}");
        for bad in ["", "yesterday", "10x", "m"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }

    /// Regression (hardening issue): a log line `log.json` did not take was dropped silently.
    #[test]
    fn log_lines_that_cannot_be_written_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        std::fs::write(&path, b"").unwrap();
        // Opened read-only: every write fails, as on a full disk.
        let mut log = LogWriter::over(std::fs::File::open(&path).unwrap(), &path);
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = Stream::new(r.into(), "stdout");
        s.write(b"one\n", &mut log, false);
        s.write(b"two\n", &mut log, false);
        assert_eq!(s.log_errors, 2);
        assert!(s.first_log_error.is_some());
        let mut ok = LogWriter::open(&path, Default::default()).unwrap();
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut good = Stream::new(r.into(), "stdout");
        good.write(b"three\n", &mut ok, false);
        assert_eq!(good.log_errors, 0);
        assert!(std::fs::read_to_string(&path).unwrap().contains("three"));
    }
}
