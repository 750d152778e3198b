//! Validation of paths found in layer tars.
//!
//! A layer may only describe paths below its own root: absolute paths and `..` are refused, not
//! silently rewritten, so a malicious layer is reported instead of half-applied.

/// Longest single name Linux accepts (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest whole path accepted (PATH_MAX).
pub const PATH_MAX: usize = 4096;

/// Why a path is not acceptable inside a layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("path contains a '..' component")]
    DotDot,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("a path component is longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("path is longer than {PATH_MAX} bytes")]
    PathTooLong,
}

/// Splits a tar member name into its components. `./a//b/` gives `["a", "b"]`; `.` and `./` give
/// no components (the layer root).
pub fn split_layer_path(raw: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    if raw.len() > PATH_MAX {
        return Err(PathError::PathTooLong);
    }
    if raw.contains(&0) {
        return Err(PathError::Nul);
    }
    if raw.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(PathError::DotDot),
            c if c.len() > NAME_MAX => return Err(PathError::NameTooLong),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// True when `name` can be one component of a path in an index.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && name.len() <= NAME_MAX
        && !name.contains(&b'/')
        && !name.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_normalises() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"./usr/bin/", &[b"usr", b"bin"]),
            (b"usr//bin", &[b"usr", b"bin"]),
            (b"./", &[]),
            (b".", &[]),
            (b"a/./b", &[b"a", b"b"]),
            ("ünï/😀".as_bytes(), &["ünï".as_bytes(), "😀".as_bytes()]),
        ];
        for (raw, want) in cases {
            assert_eq!(split_layer_path(raw).unwrap(), *want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn refuses_escapes_and_garbage() {
        let long = vec![b'x'; 256];
        let cases: &[(&[u8], PathError)] = &[
            (b"/etc/passwd", PathError::Absolute),
            (b"../etc/passwd", PathError::DotDot),
            (b"a/../../b", PathError::DotDot),
            (b"a\0b", PathError::Nul),
            (&long, PathError::NameTooLong),
        ];
        for (raw, want) in cases {
            assert_eq!(split_layer_path(raw).unwrap_err(), *want);
        }
        assert_eq!(split_layer_path(&vec![b'a'; 5000]).unwrap_err(), PathError::PathTooLong);
    }
}
