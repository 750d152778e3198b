//! The container options a user writes as text: `--network`, `-v`, `--tmpfs`, `--mount`, each
//! parsed with docker's rules or refused with what was wrong.

use std::path::PathBuf;

use crate::error::SpecError;

/// `--network`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network namespace.
    #[default]
    Host,
    /// A namespace of its own with only loopback.
    None,
}

/// `-v HOST:CONTAINER[:ro|rw]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

impl std::str::FromStr for Volume {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadVolume(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (host, container, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(bad()),
        };
        if !host.starts_with('/') || !container.starts_with('/') || container.split('/').any(|c| c == "..") {
            return Err(bad());
        }
        Ok(Volume { host: PathBuf::from(host), container: container.to_string(), read_only })
    }
}

/// `--tmpfs PATH[:OPTIONS]` (and `--mount type=tmpfs`): an empty tmpfs at `container`, with
/// docker's default options (`noexec`, `nosuid`, `nodev`) under what was asked (`exec`,
/// `size=64m`, `mode=1777`, ...).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tmpfs {
    pub container: String,
    pub options: Vec<String>,
}

impl std::str::FromStr for Tmpfs {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (container, options) = s.split_once(':').unwrap_or((s, ""));
        if !container.starts_with('/') || container.split('/').any(|c| c == "..") {
            return Err(SpecError::BadValue {
                flag: "--tmpfs",
                value: s.into(),
                why: "use an absolute path in the container, optionally :OPTIONS (size=64m,mode=1777,exec)",
            });
        }
        let options = options.split(',').filter(|o| !o.is_empty()).map(String::from).collect();
        Ok(Tmpfs { container: container.to_string(), options })
    }
}

/// `--mount type=bind|tmpfs,...`, docker's long form of `-v` and `--tmpfs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountArg {
    Bind(Volume),
    Tmpfs(Tmpfs),
}

impl std::str::FromStr for MountArg {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = |why: &'static str| SpecError::BadValue { flag: "--mount", value: s.into(), why };
        let (mut typ, mut source, mut target, mut read_only) = (None, None, None, false);
        let mut tmpfs_options = Vec::new();
        for field in s.split(',') {
            let (k, v) = field.split_once('=').map_or((field, None), |(k, v)| (k, Some(v)));
            match (k, v) {
                ("type", Some(t)) => typ = Some(t),
                ("source" | "src", Some(v)) => source = Some(v),
                ("target" | "destination" | "dst", Some(v)) => target = Some(v),
                ("readonly" | "ro", None | Some("true" | "1")) => read_only = true,
                ("readonly" | "ro", Some("false" | "0")) => read_only = false,
                ("tmpfs-size", Some(v)) => tmpfs_options.push(format!("size={v}")),
                ("tmpfs-mode", Some(v)) if u32::from_str_radix(v, 8).is_ok() => tmpfs_options.push(format!("mode={v}")),
                _ => return Err(bad("keys: type=bind|tmpfs, source, target, readonly, tmpfs-size, tmpfs-mode")),
            }
        }
        let target = target.ok_or_else(|| bad("a target (the path in the container) is needed"))?;
        match typ {
            Some("bind") => {
                let source = source.ok_or_else(|| bad("a bind mount needs a source"))?;
                let mode = if read_only { ":ro" } else { "" };
                format!("{source}:{target}{mode}")
                    .parse()
                    .map(MountArg::Bind)
                    .map_err(|_| bad("source and target must be absolute paths"))
            }
            Some("tmpfs") if source.is_none() => {
                if read_only {
                    tmpfs_options.push("ro".into());
                }
                let mut t: Tmpfs = target.parse().map_err(|_| bad("the target must be an absolute path"))?;
                t.options = tmpfs_options;
                Ok(MountArg::Tmpfs(t))
            }
            Some("tmpfs") => Err(bad("a tmpfs mount takes no source")),
            Some("volume") => Err(bad("named volumes are not supported: use type=bind with a host path")),
            _ => Err(bad("type=bind or type=tmpfs is needed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_and_tmpfs_parse_or_say_why() {
        let v: Volume = "/data:/mnt/data:ro".parse().unwrap();
        assert!(v.read_only && v.container == "/mnt/data");
        assert!("rel:/x".parse::<Volume>().is_err());
        assert!("/a:/x/../etc".parse::<Volume>().is_err());
        assert!("/a".parse::<Volume>().is_err());
        let t: Tmpfs = "/run:size=64m,exec".parse().unwrap();
        assert_eq!((t.container.as_str(), t.options.join(",")), ("/run", "size=64m,exec".to_string()));
        assert!("run".parse::<Tmpfs>().is_err());
    }

    #[test]
    fn mounts_take_dockers_long_form() {
        let m = |s: &str| s.parse::<MountArg>();
        assert_eq!(
            m("type=bind,source=/srv,target=/data,readonly").unwrap(),
            MountArg::Bind(Volume { host: "/srv".into(), container: "/data".into(), read_only: true })
        );
        assert_eq!(
            m("type=tmpfs,dst=/cache,tmpfs-size=1m,tmpfs-mode=1770").unwrap(),
            MountArg::Tmpfs(Tmpfs { container: "/cache".into(), options: vec!["size=1m".into(), "mode=1770".into()] })
        );
        for bad in [
            "type=volume,src=v,dst=/x",
            "type=bind,dst=/x",
            "source=/a,target=/b",
            "type=bind,src=/a",
            "type=tmpfs,dst=/x,color=red",
        ] {
            let e = m(bad).unwrap_err().to_string();
            assert!(e.contains("--mount") && e.contains(bad), "{bad}: {e}");
        }
    }
}
