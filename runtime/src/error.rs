//! Why a runtime spec could not be built.

/// Why a spec could not be built. Messages name the flag or image field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command: the image has no entrypoint or cmd; give one after the image name")]
    NoCommand,
    #[error("image config is not valid JSON: {0}")]
    BadConfig(String),
    #[error("unknown user {0:?} (not in the image's /etc/passwd)")]
    UnknownUser(String),
    #[error("unknown group {0:?} (not in the image's /etc/group)")]
    UnknownGroup(String),
    #[error("invalid volume {0:?}: use HOST:CONTAINER[:ro|rw] with absolute paths")]
    BadVolume(String),
    #[error("invalid {flag} value {value:?}: {why}")]
    BadValue { flag: &'static str, value: String, why: &'static str },
    #[error("building the runtime spec: {0}")]
    Oci(String),
}

pub(crate) fn oci(e: impl std::fmt::Display) -> SpecError {
    SpecError::Oci(e.to_string())
}
