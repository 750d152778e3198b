//! What an ELF program needs before it runs: its interpreter (`PT_INTERP`), the libraries it
//! names (`DT_NEEDED`), where it says to look for them (`DT_RUNPATH`/`DT_RPATH`), and how far into
//! the file its loaded segments reach. A lazy mount's first start has no recorded order; these
//! say which files the loader will map first, before the program asks.
//!
//! Input is untrusted (any file of any image): every offset and length is checked, sizes are
//! bounded, and the parser reads only through the caller's `read` (no I/O here). ELF32 and
//! ELF64, either byte order.

/// `PT_LOAD`, `PT_DYNAMIC`, `PT_INTERP`.
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Most program headers read (real programs have about a dozen).
const MAX_PHDRS: usize = 128;
/// Largest dynamic section read.
const MAX_DYNAMIC: u64 = 64 << 10;
/// Largest dynamic string table read.
const MAX_STRTAB: u64 = 1 << 20;
/// Most libraries taken from one program.
const MAX_NEEDED: usize = 64;
/// Longest interpreter path or library name.
const MAX_NAME: usize = 4096;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("malformed ELF: {0}")]
    Malformed(&'static str),
    #[error("could not read {len} bytes at offset {offset}")]
    Unreadable { offset: u64, len: u64 },
}

/// Reads `len` bytes at `offset` of the file (fewer only at its end); `None` when it cannot.
pub type ReadAt<'a> = dyn FnMut(u64, usize) -> Option<Vec<u8>> + 'a;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// An ELF file's program headers, parsed from its first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfHeaders {
    pub class64: bool,
    pub little_endian: bool,
    /// `e_machine` (62: x86-64, 183: AArch64, ...).
    pub machine: u16,
    /// Where the loaded segments end in the file: the loader maps `[0, loaded_end)` (or less).
    pub loaded_end: u64,
    interp: Option<(u64, u64)>,
    dynamic: Option<(u64, u64)>,
    loads: Vec<Segment>,
}

/// What the dynamic section names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// `DT_NEEDED`, in order.
    pub needed: Vec<Vec<u8>>,
    /// `DT_RUNPATH`, else `DT_RPATH`, split at `:` (may hold `$ORIGIN`).
    pub search: Vec<Vec<u8>>,
}

struct Fields<'a> {
    b: &'a [u8],
    le: bool,
}

impl Fields<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let s: [u8; 2] = self.b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if self.le { u16::from_le_bytes(s) } else { u16::from_be_bytes(s) })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let s: [u8; 4] = self.b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if self.le { u32::from_le_bytes(s) } else { u32::from_be_bytes(s) })
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let s: [u8; 8] = self.b.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(if self.le { u64::from_le_bytes(s) } else { u64::from_be_bytes(s) })
    }
    /// A word of the file's class.
    fn word(&self, at: usize, wide: bool) -> Option<u64> {
        if wide {
            self.u64(at)
        } else {
            self.u32(at).map(u64::from)
        }
    }
}

/// True when `head` starts like an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

impl ElfHeaders {
    /// Parses the file header and program headers, which must lie within `head` (the file's
    /// first bytes; linkers put them right after the 64-byte header). `size` is the file's size.
    pub fn parse(head: &[u8], size: u64) -> Result<ElfHeaders, ElfError> {
        if !is_elf(head) {
            return Err(ElfError::NotElf);
        }
        let class64 = match head.get(4) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(ElfError::Malformed("unknown class")),
        };
        let le = match head.get(5) {
            Some(1) => true,
            Some(2) => false,
            _ => return Err(ElfError::Malformed("unknown byte order")),
        };
        let f = Fields { b: head, le };
        let short = ElfError::Malformed("header cut short");
        let machine = f.u16(18).ok_or(short.clone())?;
        let (phoff, phentsize, phnum) =
            if class64 { (f.u64(32), f.u16(54), f.u16(56)) } else { (f.u32(28).map(u64::from), f.u16(42), f.u16(44)) };
        let (phoff, phentsize, phnum) =
            (phoff.ok_or(short.clone())?, phentsize.ok_or(short.clone())? as usize, phnum.ok_or(short)? as usize);
        let min_ent = if class64 { 56 } else { 32 };
        if phnum > MAX_PHDRS {
            return Err(ElfError::Malformed("too many program headers"));
        }
        if phnum > 0 && phentsize < min_ent {
            return Err(ElfError::Malformed("program header entries too small"));
        }
        let mut h = ElfHeaders {
            class64,
            little_endian: le,
            machine,
            loaded_end: 0,
            interp: None,
            dynamic: None,
            loads: Vec::new(),
        };
        for n in 0..phnum {
            let at = usize::try_from(phoff)
                .ok()
                .and_then(|o| o.checked_add(n * phentsize))
                .ok_or(ElfError::Malformed("program headers out of range"))?;
            let get = |o64: usize, o32: usize| f.word(at.checked_add(if class64 { o64 } else { o32 })?, class64);
            let (Some(ty), Some(offset), Some(vaddr), Some(filesz)) = (f.u32(at), get(8, 4), get(16, 8), get(32, 16))
            else {
                return Err(ElfError::Malformed("program headers lie beyond the first bytes"));
            };
            let end = offset.checked_add(filesz).ok_or(ElfError::Malformed("segment overflows"))?;
            if end > size {
                return Err(ElfError::Malformed("segment beyond the end of the file"));
            }
            match ty {
                PT_LOAD => {
                    h.loaded_end = h.loaded_end.max(end);
                    h.loads.push(Segment { offset, vaddr, filesz });
                }
                PT_DYNAMIC => h.dynamic = Some((offset, filesz)),
                PT_INTERP => h.interp = Some((offset, filesz)),
                _ => {}
            }
        }
        Ok(h)
    }

    /// The program interpreter's path (`/lib64/ld-linux-x86-64.so.2`), if it names one.
    pub fn interpreter(&self, read: &mut ReadAt<'_>) -> Result<Option<Vec<u8>>, ElfError> {
        let Some((offset, len)) = self.interp else { return Ok(None) };
        if len == 0 || len as usize > MAX_NAME {
            return Err(ElfError::Malformed("interpreter path length"));
        }
        let b = read_exact(read, offset, len)?;
        let name = b.split(|&c| c == 0).next().unwrap_or_default();
        Ok((!name.is_empty()).then(|| name.to_vec()))
    }

    /// The file offset of virtual address `v`, through the loaded segments.
    fn file_offset(&self, v: u64) -> Option<u64> {
        self.loads.iter().find(|s| v >= s.vaddr && v - s.vaddr < s.filesz).map(|s| s.offset + (v - s.vaddr))
    }

    /// The libraries the dynamic section names, and where it says to look. Empty for a static
    /// program.
    pub fn dynamic(&self, read: &mut ReadAt<'_>) -> Result<Dynamic, ElfError> {
        let Some((offset, len)) = self.dynamic else { return Ok(Dynamic::default()) };
        let b = read_exact(read, offset, len.min(MAX_DYNAMIC))?;
        let f = Fields { b: &b, le: self.little_endian };
        let ent = if self.class64 { 16 } else { 8 };
        let (mut needed, mut runpath, mut rpath, mut strtab, mut strsz) = (Vec::new(), None, None, None, None);
        for at in (0..b.len() / ent).map(|i| i * ent) {
            let (Some(tag), Some(val)) = (f.word(at, self.class64), f.word(at + ent / 2, self.class64)) else { break };
            match tag {
                DT_NULL => break,
                DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                DT_RUNPATH => runpath = Some(val),
                DT_RPATH => rpath = Some(val),
                _ => {}
            }
        }
        if needed.is_empty() && runpath.is_none() && rpath.is_none() {
            return Ok(Dynamic::default());
        }
        let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
            return Err(ElfError::Malformed("dynamic section without a string table"));
        };
        let at = self.file_offset(strtab).ok_or(ElfError::Malformed("string table outside the loaded segments"))?;
        let strings = read_exact(read, at, strsz.min(MAX_STRTAB))?;
        let name = |off: u64| -> Option<Vec<u8>> {
            let rest = strings.get(usize::try_from(off).ok()?..)?;
            let s = rest.split(|&c| c == 0).next()?;
            (!s.is_empty() && s.len() <= MAX_NAME).then(|| s.to_vec())
        };
        let search = runpath
            .or(rpath)
            .and_then(name)
            .map(|p| p.split(|&c| c == b':').filter(|d| !d.is_empty()).map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        Ok(Dynamic { needed: needed.into_iter().filter_map(name).collect(), search })
    }
}

fn read_exact(read: &mut ReadAt<'_>, offset: u64, len: u64) -> Result<Vec<u8>, ElfError> {
    let want = usize::try_from(len).map_err(|_| ElfError::Unreadable { offset, len })?;
    match read(offset, want) {
        Some(b) if b.len() >= want => Ok(b),
        _ => Err(ElfError::Unreadable { offset, len }),
    }
}

/// The multiarch triple Debian-style systems keep `machine`'s libraries under
/// (`/usr/lib/x86_64-linux-gnu`), if known.
pub fn multiarch(h: &ElfHeaders) -> Option<&'static str> {
    Some(match (h.machine, h.class64, h.little_endian) {
        (62, true, true) => "x86_64-linux-gnu",
        (3, false, true) => "i386-linux-gnu",
        (183, true, true) => "aarch64-linux-gnu",
        (40, false, true) => "arm-linux-gnueabihf",
        (243, true, true) => "riscv64-linux-gnu",
        (21, true, true) => "powerpc64le-linux-gnu",
        (22, true, false) => "s390x-linux-gnu",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian program: header, three program headers (LOAD, INTERP,
    /// DYNAMIC), the interpreter path, a dynamic section and its string table.
    fn program(needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut offs = Vec::new();
        for n in needed {
            offs.push(strtab.len() as u64);
            strtab.extend_from_slice(n.as_bytes());
            strtab.push(0);
        }
        let rp = runpath.map(|r| {
            let o = strtab.len() as u64;
            strtab.extend_from_slice(r.as_bytes());
            strtab.push(0);
            o
        });
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let (interp_at, str_at) = (64 + 3 * 56, 0x400u64);
        let dyn_at = str_at + strtab.len() as u64;
        let mut dynamic = Vec::new();
        let mut tag = |t: u64, v: u64| {
            dynamic.extend_from_slice(&t.to_le_bytes());
            dynamic.extend_from_slice(&v.to_le_bytes());
        };
        for o in &offs {
            tag(DT_NEEDED, *o);
        }
        if let Some(o) = rp {
            tag(DT_RUNPATH, o);
        }
        // The string table's address: the single LOAD maps file offset 0 at 0x400000.
        tag(DT_STRTAB, 0x400000 + str_at);
        tag(DT_STRSZ, strtab.len() as u64);
        tag(DT_NULL, 0);
        let end = dyn_at + dynamic.len() as u64;
        let mut f = vec![0u8; end as usize + 100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, n: usize, ty: u32, off: u64, vaddr: u64, size: u64| {
            let at = 64 + n * 56;
            f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        };
        ph(&mut f, 0, PT_LOAD, 0, 0x400000, end);
        ph(&mut f, 1, PT_INTERP, interp_at, 0x400000 + interp_at, interp.len() as u64);
        ph(&mut f, 2, PT_DYNAMIC, dyn_at, 0x400000 + dyn_at, dynamic.len() as u64);
        f[interp_at as usize..interp_at as usize + interp.len()].copy_from_slice(interp);
        f[str_at as usize..dyn_at as usize].copy_from_slice(&strtab);
        f[dyn_at as usize..end as usize].copy_from_slice(&dynamic);
        f
    }

    fn reader(f: &[u8]) -> impl FnMut(u64, usize) -> Option<Vec<u8>> + '_ {
        |o, n| f.get(o as usize..(o as usize + n).min(f.len())).map(<[u8]>::to_vec)
    }

    #[test]
    fn a_program_names_its_interpreter_libraries_and_search_path() {
        let f = program(&["libm.so.6", "libc.so.6"], Some("$ORIGIN/../lib:/opt/lib"));
        let h = ElfHeaders::parse(&f[..1024.min(f.len())], f.len() as u64).unwrap();
        assert_eq!((h.class64, h.machine, multiarch(&h)), (true, 62, Some("x86_64-linux-gnu")));
        assert_eq!(h.loaded_end, f.len() as u64 - 100, "the LOAD segment's end, not the file's");
        let mut r = reader(&f);
        assert_eq!(h.interpreter(&mut r).unwrap().unwrap(), b"/lib64/ld-linux-x86-64.so.2");
        let d = h.dynamic(&mut r).unwrap();
        assert_eq!(d.needed, vec![b"libm.so.6".to_vec(), b"libc.so.6".to_vec()]);
        assert_eq!(d.search, vec![b"$ORIGIN/../lib".to_vec(), b"/opt/lib".to_vec()]);
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        assert_eq!(ElfHeaders::parse(b"#!/bin/sh\n", 10), Err(ElfError::NotElf));
        let f = program(&["libc.so.6"], None);
        // Cut anywhere in the headers: an error.
        for cut in [5, 17, 40, 64, 100, 200] {
            assert!(ElfHeaders::parse(&f[..cut], f.len() as u64).is_err(), "cut at {cut}");
        }
        // A segment beyond the file's end.
        assert!(ElfHeaders::parse(&f[..1024], 300).is_err());
        // Program headers said to lie at the end of the address space: an error, no overflow.
        let mut g = f.clone();
        g[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert!(ElfHeaders::parse(&g[..1024], g.len() as u64).is_err());
        // Too many program headers.
        let mut g = f.clone();
        g[56..58].copy_from_slice(&60000u16.to_le_bytes());
        assert!(ElfHeaders::parse(&g[..1024], g.len() as u64).is_err());
        // The dynamic section unreadable: an error naming where.
        let h = ElfHeaders::parse(&f[..1024], f.len() as u64).unwrap();
        let mut none = |_: u64, _: usize| None;
        assert!(matches!(h.dynamic(&mut none), Err(ElfError::Unreadable { .. })));
        // Every single-byte corruption of the file: parses or errs, never panics.
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0xff;
            if let Ok(h) = ElfHeaders::parse(&g[..1024.min(g.len())], g.len() as u64) {
                let mut r = reader(&g);
                let _ = h.interpreter(&mut r);
                let _ = h.dynamic(&mut r);
            }
        }
    }
}
