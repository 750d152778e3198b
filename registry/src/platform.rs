//! Platforms as OCI names them (`linux/amd64`, `linux/arm/v7`).

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    /// This machine's platform.
    fn default() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        let variant = (arch == "arm64").then(|| "v8".to_string());
        Platform { os: "linux".into(), arch: arch.into(), variant }
    }
}

impl Platform {
    /// True when an index entry for `os/arch/variant` serves this platform. A variant missing on
    /// either side matches any (`linux/arm64` asks for what indexes list as `linux/arm64/v8`, and
    /// many arm64 entries name no variant at all), as containerd matches.
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        os == self.os
            && arch == self.arch
            && match (variant, self.variant.as_deref()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;
    /// Parses `os/arch[/variant]`, normalised as containerd normalises (`platforms.Normalize`):
    /// `x86_64` is `amd64`, `aarch64` is `arm64`, `armhf` is `arm/v7`, a variant `7` is `v7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let (os, arch, variant) = match parts[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => (os, arch, None),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => (os, arch, Some(v)),
            _ => return Err(format!("invalid platform {s:?}: expected os/arch[/variant], e.g. linux/amd64")),
        };
        let os = match os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_string(),
            other => other.to_string(),
        };
        let variant = variant.map(str::to_ascii_lowercase);
        let (arch, variant) = match (arch.to_ascii_lowercase().as_str(), variant.as_deref()) {
            ("i386", _) => ("386".to_string(), None),
            ("x86_64" | "x86-64" | "amd64", Some("v1")) => ("amd64".to_string(), None),
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64".to_string(), v.map(String::from)),
            ("aarch64" | "arm64", Some("8" | "v8")) => ("arm64".to_string(), Some("v8".to_string())),
            ("aarch64" | "arm64", v) => ("arm64".to_string(), v.map(String::from)),
            ("armhf", _) => ("arm".to_string(), Some("v7".to_string())),
            ("armel", _) => ("arm".to_string(), Some("v6".to_string())),
            ("arm", None) => ("arm".to_string(), Some("v7".to_string())),
            ("arm", Some(v @ ("5" | "6" | "7" | "8"))) => ("arm".to_string(), Some(format!("v{v}"))),
            (a, v) => (a.to_string(), v.map(String::from)),
        };
        Ok(Platform { os, arch, variant })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_match() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert!(p.matches("linux", "arm", Some("v7")) && !p.matches("linux", "arm", Some("v6")));
        // Regression: `--platform linux/arm64` must select an index entry `linux/arm64/v8`.
        let arm64: Platform = "linux/arm64".parse().unwrap();
        assert!(arm64.matches("linux", "arm64", Some("v8")) && arm64.matches("linux", "arm64", None));
        let amd: Platform = "linux/amd64".parse().unwrap();
        assert!(amd.matches("linux", "amd64", None) && !amd.matches("windows", "amd64", None));
        assert!("linux".parse::<Platform>().unwrap_err().contains("os/arch"));
    }

    #[test]
    fn names_are_normalised_as_containerd_normalises_them() {
        for (given, normal) in [
            ("linux/x86_64", "linux/amd64"),
            ("Linux/X86-64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/aarch64/8", "linux/arm64/v8"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("macos/arm64", "darwin/arm64"),
            ("linux/riscv64", "linux/riscv64"),
        ] {
            assert_eq!(given.parse::<Platform>().unwrap().to_string(), normal, "{given}");
        }
        let p: Platform = "linux/x86_64".parse().unwrap();
        assert!(p.matches("linux", "amd64", None));
    }
}
