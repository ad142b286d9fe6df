//! Re-pointing a qcow2 image at a different backing file (what
//! `qemu-img rebase -u` does), for merges: once a layer holds all of its
//! parent's data, its backing reference moves to the grandparent.
//!
//! Hand-written because imago (0.2) can swap the backing of an open image
//! in memory but has no call that rewrites the backing reference stored in
//! the header. Only cluster 0 is touched: the header fields, the header
//! extensions (the backing-format one is replaced) and the backing file
//! name placed right after them. The caller gets the new bytes first
//! ([`rebacked_header`]) so it can journal them before writing
//! ([`write_header`]), and a torn write can be redone.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::disk::DiskFormat;

const MAGIC: u32 = 0x5146_49fb;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Offset of the backing file offset (u64) and size (u32) fields.
const BACKING_OFFSET_AT: usize = 8;
const BACKING_SIZE_AT: usize = 16;
/// qemu limits backing file names to 1023 bytes.
const MAX_NAME: usize = 1023;

/// Errors of the header rewrite; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The header is not one this module understands.
    #[error("{path}: cannot rewrite the qcow2 header: {reason}")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Bytes of cluster 0 to write so that `path` names `backing` (a path
/// relative to the image's directory, in `format`) as its backing file.
/// The result covers everything the old header used, so writing it at
/// offset 0 leaves no trace of the old name.
pub fn rebacked_header(
    path: &Path,
    backing: &str,
    format: DiskFormat,
) -> Result<Vec<u8>, HeaderError> {
    let unsupported = |reason: String| HeaderError::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|source| HeaderError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = vec![0u8; 104];
    f.read_exact_at(&mut head, 0)
        .map_err(|source| HeaderError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if be32(&head, 0) != MAGIC {
        return Err(unsupported("not a qcow2 image".into()));
    }
    let version = be32(&head, 4);
    let cluster_bits = be32(&head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(unsupported(format!("cluster_bits {cluster_bits}")));
    }
    let cluster = 1usize << cluster_bits;
    let header_len = match version {
        2 => 72,
        3 => be32(&head, 100) as usize,
        v => return Err(unsupported(format!("version {v}"))),
    };
    if !(72..=cluster).contains(&header_len) {
        return Err(unsupported(format!("header length {header_len}")));
    }
    let mut old = vec![0u8; cluster];
    f.read_exact_at(&mut old, 0)
        .map_err(|source| HeaderError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if be64(&old, 64) != 0 && be32(&old, 60) != 0 {
        // Internal snapshots live elsewhere; they would not be harmed,
        // but snapvm never creates them, so refuse rather than guess.
        return Err(unsupported("the image has internal snapshots".into()));
    }
    // Keep every extension except the backing format, which is replaced.
    let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut at = header_len;
    let mut old_end;
    loop {
        if at + 8 > cluster {
            return Err(unsupported("header extensions run past cluster 0".into()));
        }
        let (kind, len) = (be32(&old, at), be32(&old, at + 4) as usize);
        at += 8;
        if kind == EXT_END {
            old_end = at;
            break;
        }
        let padded = len.div_ceil(8) * 8;
        if at + padded > cluster {
            return Err(unsupported("header extension runs past cluster 0".into()));
        }
        if kind == EXT_DATA_FILE {
            return Err(unsupported("the image has an external data file".into()));
        }
        if kind != EXT_BACKING_FORMAT {
            exts.push((kind, old[at..at + len].to_vec()));
        }
        at += padded;
    }
    let old_name_off = be64(&old, BACKING_OFFSET_AT) as usize;
    let old_name_len = be32(&old, BACKING_SIZE_AT) as usize;
    if old_name_off != 0 {
        old_end = old_end.max(old_name_off.saturating_add(old_name_len).min(cluster));
    }
    if backing.is_empty() || backing.len() > MAX_NAME {
        return Err(unsupported(format!(
            "backing file name of {} bytes",
            backing.len()
        )));
    }
    exts.insert(0, (EXT_BACKING_FORMAT, format.name().as_bytes().to_vec()));

    let mut new = old[..header_len].to_vec();
    for (kind, data) in &exts {
        new.extend_from_slice(&kind.to_be_bytes());
        new.extend_from_slice(&(data.len() as u32).to_be_bytes());
        new.extend_from_slice(data);
        new.resize(new.len().div_ceil(8) * 8, 0);
    }
    new.extend_from_slice(&[0u8; 8]);
    let name_off = new.len();
    new.extend_from_slice(backing.as_bytes());
    if new.len() > cluster {
        return Err(unsupported(format!(
            "the new header needs {} bytes, more than the {cluster}-byte cluster 0",
            new.len()
        )));
    }
    new[BACKING_OFFSET_AT..BACKING_OFFSET_AT + 8].copy_from_slice(&(name_off as u64).to_be_bytes());
    new[BACKING_SIZE_AT..BACKING_SIZE_AT + 4]
        .copy_from_slice(&(backing.len() as u32).to_be_bytes());
    // Cover the old header's extent so none of the old name survives.
    if new.len() < old_end {
        new.resize(old_end, 0);
    }
    Ok(new)
}

/// Writes `header` (from [`rebacked_header`]) at offset 0 of `path` and
/// makes it durable. Idempotent: a torn or lost write is repaired by
/// writing the same bytes again.
pub fn write_header(path: &Path, header: &[u8]) -> Result<(), HeaderError> {
    write_header_unsynced(path, header)?;
    sync(path)
}

/// [`write_header`] without the fsync, for a caller that must not wait
/// for the file's other dirty data at that moment; it calls [`sync`]
/// before anything depends on the new header.
pub fn write_header_unsynced(path: &Path, header: &[u8]) -> Result<(), HeaderError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| HeaderError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all_at(header, 0).map_err(|source| HeaderError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes everything written to `path` durable.
pub fn sync(path: &Path) -> Result<(), HeaderError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| HeaderError::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{create_overlay, resolve_chain, Disk};

    /// A damaged qcow2 header (cluster 0): the rewrite refuses it naming the
    /// file, or rewrites it, never a panic or a write past the header.
    #[test]
    fn fuzz_header_rewrite() {
        let d = std::env::temp_dir().join(format!("snapvm-hdr-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let base = d.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 16]).unwrap();
        let top = d.join("top.qcow2");
        create_overlay(&base, &top).unwrap();
        let valid = std::fs::read(&top).unwrap();
        let head = valid.len().min(1024);
        fuzzing::run("qcow2 header rewrite", 2000, 256, |u| {
            let mut bytes = fuzzing::mutate(&valid[..head], u)?;
            if bytes.len() >= head {
                bytes.extend_from_slice(&valid[head..]);
            }
            std::fs::write(&top, &bytes).unwrap();
            let name: String = u.arbitrary()?;
            match rebacked_header(&top, &name, DiskFormat::Raw) {
                Ok(h) => assert!(h.len() <= 65536, "the rewrite stays in cluster 0"),
                Err(e) => assert!(e.to_string().contains("top.qcow2"), "{e}"),
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rebase_points_at_the_grandparent_and_keeps_data() {
        let d = std::env::temp_dir().join(format!("snapvm-hdr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let base = d.join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let mid = d.join("a-rather-long-middle-layer-name.qcow2");
        create_overlay(&base, &mid).unwrap();
        let top = d.join("top.qcow2");
        create_overlay(&mid, &top).unwrap();
        {
            let t = Disk::open(&top, false).unwrap();
            t.write_at(&[9u8; 4096], 65536).unwrap();
            t.flush().unwrap();
        }
        let h = rebacked_header(&top, "base.raw", DiskFormat::Raw).unwrap();
        write_header(&top, &h).unwrap();
        // Writing twice (a redo after a crash) changes nothing.
        write_header(&top, &h).unwrap();
        let chain = resolve_chain(&top).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].format, DiskFormat::Raw);
        assert!(chain[1].path.ends_with("base.raw"));
        let t = Disk::open(&top, true).unwrap();
        let mut b = vec![0u8; 8192];
        t.read_at(&mut b, 61440).unwrap();
        assert_eq!(&b[..4096], &[7u8; 4096][..]);
        assert_eq!(&b[4096..], &[9u8; 4096][..]);
        // And back to a qcow2 backing with a longer name.
        drop(t);
        let h = rebacked_header(
            &top,
            mid.file_name().unwrap().to_str().unwrap(),
            DiskFormat::Qcow2,
        )
        .unwrap();
        write_header(&top, &h).unwrap();
        assert_eq!(resolve_chain(&top).unwrap().len(), 3);
        let e = rebacked_header(&base, "x", DiskFormat::Raw)
            .unwrap_err()
            .to_string();
        assert!(e.contains("base.raw") && e.contains("not a qcow2"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
