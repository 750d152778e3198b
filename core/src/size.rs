//! Sizes as people write them: `512`, `64k`, `10M`, `1.5G`, `2T`, `10MiB`, `10MB`. One parser for
//! every size hb reads (`--max-size`, `--bandwidth`, `--memory`, the config file's sizes).
//! Suffixes are binary (K = 1024, as docker's `--memory`), case-insensitive, with an optional
//! trailing `B`, `iB`; plain numbers are bytes.

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size (a number with an optional K, M, G, T or P suffix, e.g. 512K, 10M, 1.5G, 2T)")]
    Malformed(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Bytes in `s`, rounded down to a whole byte.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError::Malformed(s.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let unitless = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let (num, shift) = match unitless.chars().last() {
        Some('k') => (&unitless[..unitless.len() - 1], 10),
        Some('m') => (&unitless[..unitless.len() - 1], 20),
        Some('g') => (&unitless[..unitless.len() - 1], 30),
        Some('t') => (&unitless[..unitless.len() - 1], 40),
        Some('p') => (&unitless[..unitless.len() - 1], 50),
        _ if unitless.len() < lower.len() && lower.ends_with("ib") => return Err(bad()),
        _ => (unitless, 0),
    };
    let num = num.trim();
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(|| SizeError::TooLarge(s.to_string()));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(SizeError::TooLarge(s.to_string()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_people_write_them() {
        let ok = [
            ("512", 512),
            ("0", 0),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("10M", 10 << 20),
            ("10MB", 10 << 20),
            ("10MiB", 10 << 20),
            ("1.5G", 3 << 29),
            ("2T", 2 << 40),
            ("200G", 200 << 30),
            ("1p", 1 << 50),
            (" 7m ", 7 << 20),
            ("100b", 100),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        for s in ["", "M", "-1M", "1.2.3G", "10X", "ten", "1e3", "NaNG", "inf", "10iB", "1 0M"] {
            assert!(matches!(parse_size(s), Err(SizeError::Malformed(_))), "{s}: {:?}", parse_size(s));
        }
        assert!(matches!(parse_size("16385P"), Err(SizeError::TooLarge(_))));
        assert!(parse_size("99999999999999999999").is_err());
    }
}
