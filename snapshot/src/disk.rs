//! Disk layer stacks: a raw or qcow2 base image with qcow2 differencing
//! layers above it, each backed by its parent through a relative path.
//!
//! The qcow2 format itself is the `imago` crate's (sync API). This module
//! adds what snapvm needs on top: it resolves and opens a whole backing chain
//! explicitly (every parent read-only, clear errors naming the missing or
//! unsupported file), and creates new overlays with a relative backing path
//! and the backing format recorded, so `qemu-img info --backing-chain`,
//! `check`, `compare` and `convert` work on snapvm's files.

use std::io;
use std::path::{Path, PathBuf};

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Storage,
    StorageCreateOptions, StorageOpenOptions,
};

/// Errors of the disk layer stack; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file does not exist or cannot be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A backing file named in a qcow2 header is missing.
    #[error("backing file {backing} of disk layer {layer} is missing: {source}")]
    MissingBacking {
        /// The layer whose header names it.
        layer: PathBuf,
        /// The resolved backing path.
        backing: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is a disk format snapvm does not support.
    #[error("disk {path} is a {format} image; snapvm supports raw and qcow2 (convert it: qemu-img convert -O qcow2 {path} NEW.qcow2)")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The detected format.
        format: &'static str,
    },
    /// A raw image whose size is not whole sectors, or that is empty.
    #[error("disk {path} is not a usable raw image: {reason}")]
    BadRaw {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// imago rejected a qcow2 image.
    #[error("disk {path} is not a valid qcow2 image: {source}")]
    BadQcow2 {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The chain loops back on itself or is unreasonably deep.
    #[error("backing chain of {0} is too deep or loops")]
    ChainTooDeep(PathBuf),
    /// A qcow2 feature snapvm does not support (external data file).
    #[error("disk {path} uses {feature}, which snapvm does not support")]
    UnsupportedFeature {
        /// The file.
        path: PathBuf,
        /// The feature.
        feature: &'static str,
    },
    /// Creating an overlay failed.
    #[error("cannot create disk layer {path}: {source}")]
    Create {
        /// The new file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// What a layer holds itself at some range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Data of its own.
    Data,
    /// Explicit zeroes (they hide the backing file's data).
    Zero,
    /// Nothing: reads fall through to the backing file.
    Below,
}

/// Image format of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw sectors.
    Raw,
    /// qcow2.
    Qcow2,
}

impl DiskFormat {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One layer of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Path of the file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

const MAX_CHAIN: usize = 64;

/// Detects the format of `path` from its first bytes.
pub fn probe_format(path: &Path) -> Result<DiskFormat, DiskError> {
    use std::io::Read;
    let open_err = |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let meta = f.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(open_err(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]).map_err(open_err)? {
            0 => break,
            n => got += n,
        }
    }
    let unsupported = |format| {
        Err(DiskError::Unsupported {
            path: path.to_path_buf(),
            format,
        })
    };
    match &head[..8.min(got)] {
        [b'Q', b'F', b'I', 0xfb, ..] => return Ok(DiskFormat::Qcow2),
        [b'K', b'D', b'M', b'V', ..] => return unsupported("VMDK"),
        [b'Q', b'E', b'D', 0, ..] => return unsupported("QED"),
        [b'L', b'U', b'K', b'S', 0xba, 0xbe, ..] => return unsupported("LUKS"),
        b"vhdxfile" => return unsupported("VHDX"),
        b"conectix" => return unsupported("VHD"),
        _ => {}
    }
    if got >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return unsupported("VDI");
    }
    let len = meta.len();
    if len == 0 {
        return Err(DiskError::BadRaw {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    if !len.is_multiple_of(512) {
        return Err(DiskError::BadRaw {
            path: path.to_path_buf(),
            reason: format!("its size {len} is not a multiple of 512 bytes"),
        });
    }
    Ok(DiskFormat::Raw)
}

fn storage_opts(path: &Path, write: bool) -> StorageOpenOptions {
    StorageOpenOptions::new().filename(path).write(write)
}

fn open_file(path: &Path, write: bool) -> Result<File, DiskError> {
    File::open(storage_opts(path, write)).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a qcow2 header's backing reference (resolved relative to `path`).
fn qcow2_backing(path: &Path) -> Result<Option<Layer>, DiskError> {
    let q = Qcow2::<File>::builder(open_file(path, false)?)
        .backing(None)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(|source| DiskError::BadQcow2 {
            path: path.to_path_buf(),
            source,
        })?;
    if q.requires_external_data_file() {
        return Err(DiskError::UnsupportedFeature {
            path: path.to_path_buf(),
            feature: "an external data file",
        });
    }
    let Some(name) = q.implicit_backing_file() else {
        return Ok(None);
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let backing = dir.join(name);
    let meta = std::fs::metadata(&backing);
    if let Err(source) = meta {
        return Err(DiskError::MissingBacking {
            layer: path.to_path_buf(),
            backing,
            source,
        });
    }
    let format = match q.implicit_backing_format().map(String::as_str) {
        Some("raw") => DiskFormat::Raw,
        Some("qcow2") => DiskFormat::Qcow2,
        _ => probe_format(&backing)?,
    };
    Ok(Some(Layer {
        path: backing,
        format,
    }))
}

/// Resolves the chain of `path`, top layer first, base last.
pub fn resolve_chain(path: &Path) -> Result<Vec<Layer>, DiskError> {
    let mut chain = vec![Layer {
        path: path.to_path_buf(),
        format: probe_format(path)?,
    }];
    loop {
        let last = chain.last().expect("chain is never empty");
        if last.format == DiskFormat::Raw {
            return Ok(chain);
        }
        match qcow2_backing(&last.path)? {
            None => return Ok(chain),
            Some(l) => {
                if chain.len() >= MAX_CHAIN {
                    return Err(DiskError::ChainTooDeep(path.to_path_buf()));
                }
                chain.push(l);
            }
        }
    }
}

fn open_layer(
    layer: &Layer,
    write: bool,
    backing: Option<FormatAccess<File>>,
) -> Result<FormatAccess<File>, DiskError> {
    let file = open_file(&layer.path, write)?;
    match layer.format {
        DiskFormat::Raw => Raw::builder(file)
            .write(write)
            .open(DenyImplicitOpenGate::default())
            .map(FormatAccess::new)
            .map_err(|source| DiskError::Open {
                path: layer.path.clone(),
                source,
            }),
        DiskFormat::Qcow2 => Qcow2::<File>::builder(file)
            .backing(backing)
            .write(write)
            .open(DenyImplicitOpenGate::default())
            .map(FormatAccess::new)
            .map_err(|source| DiskError::BadQcow2 {
                path: layer.path.clone(),
                source,
            }),
    }
}

/// An opened disk: the top layer (writable unless read-only) over its
/// read-only backing chain.
pub struct Disk {
    access: FormatAccess<File>,
    chain: Vec<Layer>,
    readonly: bool,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("chain", &self.chain)
            .field("readonly", &self.readonly)
            .finish()
    }
}

impl Disk {
    /// Opens `path` and its whole backing chain. Only the top layer is ever
    /// opened for writing, and only when `readonly` is false.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let chain = resolve_chain(path)?;
        let mut below: Option<FormatAccess<File>> = None;
        for (i, layer) in chain.iter().enumerate().rev() {
            let write = i == 0 && !readonly;
            below = Some(open_layer(layer, write, below.take())?);
        }
        Ok(Self {
            access: below.expect("chain is never empty"),
            chain,
            readonly,
        })
    }

    /// The layers, top first.
    pub fn chain(&self) -> &[Layer] {
        &self.chain
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.access.read(buf, offset)
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.access.write(buf, offset)
    }

    /// Writes zeroes over `[offset, offset + len)`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.access.write_zeroes(offset, len)
    }

    /// Writes cached metadata (L2 tables, refcounts) to the image file
    /// without fsync: the image is consistent for any reader, and survives
    /// the death of this process (not a power loss: see [`Disk::flush`]).
    pub fn write_back(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.access.flush()
    }

    /// Makes every completed write durable (metadata and data).
    pub fn flush(&self) -> io::Result<()> {
        self.access.flush()?;
        self.access.sync()
    }

    /// Opens only the top layer of `path`, read-only and without its
    /// backing chain: reads return what this layer holds itself (zeroes
    /// where it holds nothing). For walking a layer's own extents.
    pub fn open_alone(path: &Path) -> Result<Self, DiskError> {
        let layer = Layer {
            path: path.to_path_buf(),
            format: probe_format(path)?,
        };
        let access = open_layer(&layer, false, None)?;
        Ok(Self {
            access,
            chain: vec![layer],
            readonly: true,
        })
    }

    /// What the top layer itself holds at `offset`, and for how many bytes
    /// (at most `max_len`) that stays so.
    pub fn top_extent(&self, offset: u64, max_len: u64) -> io::Result<(Held, u64)> {
        use imago::format::drivers::ShallowMapping;
        let (m, len) = self.access.get_shallow_mapping(offset, max_len)?;
        let held = match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Held::Data,
            ShallowMapping::Zero { explicit: true, .. } => Held::Zero,
            ShallowMapping::Zero { .. } | ShallowMapping::Indirect { .. } => Held::Below,
            ShallowMapping::Eof { .. } => Held::Below,
            _ => {
                return Err(io::Error::other(format!(
                    "{}: unknown kind of mapping at offset {offset}",
                    self.chain[0].path.display()
                )))
            }
        };
        Ok((held, len.max(1).min(max_len)))
    }

    /// Merge step: writes the parts of `buf` (data of the backing layer
    /// placed at `offset`) that the top layer does not hold itself, or
    /// zeroes there where `zero`. What the top holds already is newer and
    /// stays. Returns the bytes written.
    pub fn fill_below(&self, buf: &[u8], offset: u64, zero: bool) -> io::Result<u64> {
        let mut copied = 0;
        let mut at = offset;
        let end = offset + buf.len() as u64;
        while at < end {
            let (held, n) = self.top_extent(at, end - at)?;
            if held == Held::Below {
                if zero {
                    self.write_zeroes(at, n)?;
                } else {
                    let i = (at - offset) as usize;
                    self.write_at(&buf[i..i + n as usize], at)?;
                }
                copied += n;
            }
            at += n;
        }
        Ok(copied)
    }

    /// Switches to `new_top`, a pre-created empty overlay whose backing file
    /// is this disk's top layer: from here on writes land in `new_top` and
    /// the old top is only read. The old top's cached metadata is written to
    /// its file first (its fsync can come later: nothing writes it any
    /// more). Cheap enough to run while the guest is paused: the old layer
    /// stays open and becomes the new layer's backing as it is.
    pub fn fork(self, new_top: &Path) -> Result<Disk, DiskError> {
        let Disk {
            access,
            mut chain,
            readonly,
        } = self;
        let old = chain[0].path.clone();
        access.flush().map_err(|source| DiskError::Open {
            path: old.clone(),
            source,
        })?;
        let file = open_file(new_top, !readonly)?;
        let access = Qcow2::<File>::builder(file)
            .backing(Some(access))
            .write(!readonly)
            .open(DenyImplicitOpenGate::default())
            .map(FormatAccess::new)
            .map_err(|source| DiskError::BadQcow2 {
                path: new_top.to_path_buf(),
                source,
            })?;
        chain.insert(
            0,
            Layer {
                path: new_top.to_path_buf(),
                format: DiskFormat::Qcow2,
            },
        );
        Ok(Disk {
            access,
            chain,
            readonly,
        })
    }
}

/// Creates a qcow2 overlay at `new` over `backing` (of `format`, `size`
/// bytes) without opening `backing`, which a running VM may be writing.
pub fn create_overlay_sized(
    backing: &Path,
    format: DiskFormat,
    size: u64,
    new: &Path,
) -> Result<(), DiskError> {
    let create_err = |source| DiskError::Create {
        path: new.to_path_buf(),
        source,
    };
    let rel = relative_path(backing, new.parent().unwrap_or(Path::new(".")));
    let file =
        File::create_open(StorageCreateOptions::new().filename(new).size(0)).map_err(create_err)?;
    // A file that exists but could not be finished (a full disk) is
    // removed: nothing names it, and nothing would ever clean it up.
    let finished = Qcow2::<File>::create_builder(file)
        .size(size)
        .backing(rel.to_string_lossy().into_owned(), format.name().into())
        .create()
        .and_then(|_| std::fs::File::open(new).and_then(|f| f.sync_all()));
    if let Err(e) = finished {
        let _ = std::fs::remove_file(new);
        return Err(create_err(e));
    }
    Ok(())
}

/// Creates a qcow2 overlay at `new` whose backing file is `backing` (stored
/// relative to `new`'s directory, with its format), of the same size.
pub fn create_overlay(backing: &Path, new: &Path) -> Result<(), DiskError> {
    let base = Disk::open(backing, true)?;
    let format = base.chain()[0].format;
    let size = base.size();
    drop(base);
    create_overlay_sized(backing, format, size, new)
}

/// Creates a new empty qcow2 image of `size` bytes with no backing file.
pub fn create_qcow2(path: &Path, size: u64) -> Result<(), DiskError> {
    let create_err = |source| DiskError::Create {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create_open(StorageCreateOptions::new().filename(path).size(0))
        .map_err(create_err)?;
    Qcow2::<File>::create_builder(file)
        .size(size)
        .create()
        .map_err(create_err)?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(create_err)
}

/// `target` expressed relative to directory `from` (both made absolute).
pub fn relative_path(target: &Path, from: &Path) -> PathBuf {
    let abs = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        })
    };
    let (t, f) = (abs(target), abs(from));
    let tc: Vec<_> = t.components().collect();
    let fc: Vec<_> = f.components().collect();
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let mut r = PathBuf::new();
    for _ in common..fc.len() {
        r.push("..");
    }
    for c in &tc[common..] {
        r.push(c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::Tmp;

    #[test]
    fn chain_reads_through_and_writes_only_the_top() {
        let t = Tmp::new("chain");
        let base = t.0.join("base.raw");
        std::fs::write(&base, vec![0xaa; 1 << 20]).unwrap();
        let mid = t.0.join("sub/mid.qcow2");
        std::fs::create_dir_all(t.0.join("sub")).unwrap();
        create_overlay(&base, &mid).unwrap();
        let top = t.0.join("top.qcow2");
        create_overlay(&mid, &top).unwrap();

        let chain = resolve_chain(&top).unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1].format, DiskFormat::Qcow2);
        assert_eq!(chain[2].format, DiskFormat::Raw);
        assert_eq!(
            std::fs::canonicalize(&chain[2].path).unwrap(),
            std::fs::canonicalize(&base).unwrap()
        );

        let d = Disk::open(&top, false).unwrap();
        assert_eq!(d.size(), 1 << 20);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0xaa; 512]);
        d.write_at(&[0x55; 512], 4096).unwrap();
        d.flush().unwrap();
        drop(d);
        let d = Disk::open(&top, true).unwrap();
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0x55; 512]);
        assert!(
            d.write_at(&[0; 512], 0).is_err(),
            "read-only disk refuses writes"
        );
        // Lower layers untouched.
        let m = Disk::open(&mid, true).unwrap();
        m.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0xaa; 512]);
        assert_eq!(std::fs::read(&base).unwrap(), vec![0xaa; 1 << 20]);
    }

    #[test]
    fn errors_name_the_file() {
        let t = Tmp::new("errors");
        let base = t.0.join("base.raw");
        std::fs::write(&base, vec![0; 4096]).unwrap();
        let top = t.0.join("top.qcow2");
        create_overlay(&base, &top).unwrap();
        std::fs::remove_file(&base).unwrap();
        let e = Disk::open(&top, false).unwrap_err().to_string();
        assert!(
            e.contains("backing file") && e.contains("base.raw") && e.contains("top.qcow2"),
            "{e}"
        );

        let vmdk = t.0.join("x.vmdk");
        std::fs::write(&vmdk, b"KDMV\x01\0\0\0 and more").unwrap();
        let e = Disk::open(&vmdk, false).unwrap_err().to_string();
        assert!(e.contains("VMDK") && e.contains("x.vmdk"), "{e}");

        let odd = t.0.join("odd.img");
        std::fs::write(&odd, vec![0; 1000]).unwrap();
        let e = Disk::open(&odd, false).unwrap_err().to_string();
        assert!(e.contains("multiple of 512"), "{e}");

        let e = Disk::open(&t.0.join("nope.img"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.img"), "{e}");
    }

    #[test]
    fn fork_moves_writes_to_the_new_layer() {
        let t = Tmp::new("fork");
        let base = t.0.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = t.0.join("top.qcow2");
        create_overlay(&base, &top).unwrap();
        let d = Disk::open(&top, false).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        let next = t.0.join("next.qcow2");
        create_overlay_sized(&top, DiskFormat::Qcow2, d.size(), &next).unwrap();
        let d = d.fork(&next).unwrap();
        assert_eq!(d.chain().len(), 3);
        d.write_at(&[2; 512], 512).unwrap();
        let mut b = [0u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[1; 512][..]);
        assert_eq!(&b[512..], &[2; 512][..]);
        d.flush().unwrap();
        drop(d);
        // The old top holds exactly what it had at the fork.
        let old = Disk::open(&top, true).unwrap();
        old.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[1; 512][..]);
        assert_eq!(&b[512..], &[0; 512][..]);
        let new = Disk::open(&next, true).unwrap();
        new.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[512..], &[2; 512][..]);
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/d")),
            PathBuf::from("../b/c")
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a")),
            PathBuf::from("b")
        );
    }
}
