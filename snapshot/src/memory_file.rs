//! memory.bin: guest memory of a snapshot.
//!
//! Page data sits at file offset = guest-physical address, so the file can be
//! mapped directly; all-zero pages (and the MMIO gap) are holes. After the
//! data comes a trailer and a fixed-size footer:
//!
//! ```text
//! [0, data_end)        page data (sparse)
//! [data_end, +len)     trailer: magic "SNAPVMMB", version, page size, chunk
//!                      size, regions (gpa, size), one CRC32 per chunk of each
//!                      region (zeros included), CRC32 of the trailer
//! last 32 bytes        footer: magic "SNAPVMFT", version, reserved,
//!                      trailer offset, trailer length
//! ```
//!
//! Readers reject a wrong magic, an unknown version, a truncated file and a
//! bad checksum, naming the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk_crc::ChunkCrcs;

/// Current format version.
pub const VERSION: u32 = 1;
/// Page size of the format.
pub const PAGE_SIZE: u64 = 4096;
/// Checksum granularity.
pub const CHUNK_SIZE: u64 = 2 << 20;
const TRAILER_MAGIC: &[u8; 8] = b"SNAPVMMB";
const FOOTER_MAGIC: &[u8; 8] = b"SNAPVMFT";
const FOOTER_LEN: u64 = 32;

/// Errors reading or writing memory.bin; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// I/O failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Not a snapvm memory file.
    #[error("{0}: not a snapvm memory file (bad magic)")]
    BadMagic(PathBuf),
    /// A version this snapvm cannot read.
    #[error(
        "{path}: unsupported memory file version {version} (this snapvm reads version {VERSION})"
    )]
    BadVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The file is shorter than its own description says.
    #[error("{0}: truncated memory file")]
    Truncated(PathBuf),
    /// The trailer is corrupt.
    #[error("{0}: corrupt memory file trailer (checksum mismatch)")]
    BadTrailer(PathBuf),
    /// A chunk of page data is corrupt.
    #[error(
        "{path}: corrupt memory data in chunk {chunk} (guest-physical {gpa:#x}): checksum mismatch"
    )]
    BadChunk {
        /// The file.
        path: PathBuf,
        /// Chunk index.
        chunk: usize,
        /// Guest-physical start of the chunk.
        gpa: u64,
    },
    /// The regions do not match the VM being restored.
    #[error("{path}: memory layout {found:?} does not match the VM's {expected:?}")]
    LayoutMismatch {
        /// The file.
        path: PathBuf,
        /// Regions in the file.
        found: Vec<(u64, u64)>,
        /// Regions expected.
        expected: Vec<(u64, u64)>,
    },
}

/// A guest RAM region: guest-physical start and size (page aligned).
pub type Region = (u64, u64);

/// Chunks of a region: (gpa, len) pairs.
pub fn chunks(regions: &[Region]) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for &(gpa, size) in regions {
        let mut off = 0;
        while off < size {
            let len = CHUNK_SIZE.min(size - off);
            v.push((gpa + off, len));
            off += len;
        }
    }
    v
}

fn data_end(regions: &[Region]) -> u64 {
    let end = regions.iter().map(|(g, s)| g + s).max().unwrap_or(0);
    end.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Writes memory.bin: pages at their guest-physical offsets, then `finish`.
pub struct MemoryFileWriter {
    file: File,
    path: PathBuf,
    regions: Vec<Region>,
    /// Checksums of what [`MemoryFileWriter::write_at`] wrote.
    crcs: ChunkCrcs,
}

impl MemoryFileWriter {
    /// Creates (truncates) `path`, sized for `regions` and all holes.
    pub fn create(path: &Path, regions: &[Region]) -> Result<Self, MemoryFileError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| MemoryFileError::Io { path, what, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io("cannot create"))?;
        file.set_len(data_end(regions)).map_err(io("cannot size"))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            regions: regions.to_vec(),
            crcs: ChunkCrcs::default(),
        })
    }

    /// The file, to read (writes go through [`MemoryFileWriter::write_at`],
    /// which keeps the checksums).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at guest-physical `gpa`.
    /// Safe from several threads; each byte is written at most once.
    pub fn write_at(&self, data: &[u8], gpa: u64) -> Result<(), MemoryFileError> {
        self.file
            .write_all_at(data, gpa)
            .map_err(|source| MemoryFileError::Io {
                path: self.path.clone(),
                what: "cannot write page data",
                source,
            })?;
        self.crcs.record(gpa, data);
        Ok(())
    }

    /// Starts writeback of `[offset, offset + len)` without waiting, so the
    /// final fsync overlaps with streaming instead of following it.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range on our own descriptor; it only schedules
        // I/O and touches no memory of this process.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    /// Takes the chunk checksums computed while the data was written
    /// (src/chunk_crc.rs; a chunk they cannot describe is read back),
    /// appends trailer and footer, and fsyncs. Returns the bytes of page data on disk
    /// (excluding holes) as far as the file system reports them.
    pub fn finish(mut self) -> Result<u64, MemoryFileError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| MemoryFileError::Io { path, what, source }
        };
        let mut trailer = Vec::new();
        trailer.extend_from_slice(TRAILER_MAGIC);
        trailer.extend_from_slice(&VERSION.to_le_bytes());
        trailer.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        trailer.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        trailer.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (g, s) in &self.regions {
            trailer.extend_from_slice(&g.to_le_bytes());
            trailer.extend_from_slice(&s.to_le_bytes());
        }
        let chunks = chunks(&self.regions);
        trailer.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
        let known = std::mem::take(&mut self.crcs).finish(&chunks);
        let mut buf = Vec::new();
        for ((gpa, len), crc) in chunks.iter().zip(known) {
            let crc = match crc {
                Some(c) => c,
                None => {
                    buf.resize(*len as usize, 0);
                    self.file
                        .read_exact_at(&mut buf, *gpa)
                        .map_err(io("cannot read back page data"))?;
                    crc32fast::hash(&buf)
                }
            };
            trailer.extend_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&trailer);
        trailer.extend_from_slice(&crc.to_le_bytes());
        let off = data_end(&self.regions);
        self.file
            .write_all_at(&trailer, off)
            .map_err(io("cannot write trailer"))?;
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(FOOTER_MAGIC);
        footer.extend_from_slice(&VERSION.to_le_bytes());
        footer.extend_from_slice(&0u32.to_le_bytes());
        footer.extend_from_slice(&off.to_le_bytes());
        footer.extend_from_slice(&(trailer.len() as u64).to_le_bytes());
        self.file
            .write_all_at(&footer, off + trailer.len() as u64)
            .map_err(io("cannot write footer"))?;
        self.file.sync_all().map_err(io("cannot fsync"))?;
        let meta = self.file.metadata().map_err(io("cannot stat"))?;
        use std::os::unix::fs::MetadataExt;
        Ok(meta.blocks() * 512)
    }
}

/// A validated memory.bin.
pub struct MemoryFile {
    file: File,
    path: PathBuf,
    regions: Vec<Region>,
    crcs: Vec<u32>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

impl MemoryFile {
    /// Opens and validates footer and trailer (not the page data: see
    /// [`MemoryFile::read_chunk`]).
    pub fn open(path: &Path) -> Result<Self, MemoryFileError> {
        let p = path.to_path_buf();
        let io = |what| {
            let path = p.clone();
            move |source| MemoryFileError::Io { path, what, source }
        };
        let file = File::open(path).map_err(io("cannot open"))?;
        let len = file.metadata().map_err(io("cannot stat"))?.len();
        if len < FOOTER_LEN {
            return Err(MemoryFileError::Truncated(p));
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, len - FOOTER_LEN)
            .map_err(io("cannot read footer"))?;
        if &footer[..8] != FOOTER_MAGIC {
            // A file cut short loses its footer: say "truncated" when the
            // trailer magic is still there but not at the end.
            return Err(MemoryFileError::BadMagic(p));
        }
        let version = u32_at(&footer, 8).unwrap_or(0);
        if version != VERSION {
            return Err(MemoryFileError::BadVersion { path: p, version });
        }
        let toff = u64_at(&footer, 16).unwrap_or(u64::MAX);
        let tlen = u64_at(&footer, 24).unwrap_or(u64::MAX);
        if toff
            .checked_add(tlen)
            .and_then(|e| e.checked_add(FOOTER_LEN))
            != Some(len)
            || tlen < 32
        {
            return Err(MemoryFileError::Truncated(p));
        }
        let mut t = vec![0u8; tlen as usize];
        file.read_exact_at(&mut t, toff)
            .map_err(io("cannot read trailer"))?;
        let body = &t[..t.len() - 4];
        if u32_at(&t, t.len() - 4) != Some(crc32fast::hash(body)) {
            return Err(MemoryFileError::BadTrailer(p));
        }
        if &t[..8] != TRAILER_MAGIC {
            return Err(MemoryFileError::BadMagic(p));
        }
        let tv = u32_at(&t, 8).unwrap_or(0);
        if tv != VERSION {
            return Err(MemoryFileError::BadVersion {
                path: p,
                version: tv,
            });
        }
        let bad = || MemoryFileError::BadTrailer(path.to_path_buf());
        if u32_at(&t, 12) != Some(PAGE_SIZE as u32) || u32_at(&t, 16) != Some(CHUNK_SIZE as u32) {
            return Err(bad());
        }
        let nreg = u32_at(&t, 20).ok_or_else(bad)? as usize;
        let mut regions = Vec::new();
        let mut off = 24;
        for _ in 0..nreg {
            regions.push((
                u64_at(&t, off).ok_or_else(bad)?,
                u64_at(&t, off + 8).ok_or_else(bad)?,
            ));
            off += 16;
        }
        let nchunks = u64_at(&t, off).ok_or_else(bad)? as usize;
        off += 8;
        if nchunks != chunks(&regions).len() || data_end(&regions) != toff {
            return Err(bad());
        }
        let mut crcs = Vec::with_capacity(nchunks);
        for i in 0..nchunks {
            crcs.push(u32_at(&t, off + 4 * i).ok_or_else(bad)?);
        }
        Ok(Self {
            file,
            path: p,
            regions,
            crcs,
        })
    }

    /// The regions recorded.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Fails unless the file's regions are `expected`.
    pub fn check_layout(&self, expected: &[Region]) -> Result<(), MemoryFileError> {
        if self.regions != expected {
            return Err(MemoryFileError::LayoutMismatch {
                path: self.path.clone(),
                found: self.regions.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    /// Chunk descriptors: (gpa, len) in file order.
    pub fn chunks(&self) -> Vec<(u64, u64)> {
        chunks(&self.regions)
    }

    /// Reads chunk `i` into `buf` (its exact length) and verifies it.
    pub fn read_chunk(&self, i: usize, buf: &mut [u8]) -> Result<(), MemoryFileError> {
        let (gpa, _) = self.chunks()[i];
        self.read_verified(i, gpa, buf)
    }

    /// Reads chunk `i` at `gpa` into `buf` and verifies its checksum.
    pub fn read_verified(&self, i: usize, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryFileError> {
        self.file
            .read_exact_at(buf, gpa)
            .map_err(|source| MemoryFileError::Io {
                path: self.path.clone(),
                what: "cannot read page data",
                source,
            })?;
        if self.crcs.get(i) != Some(&crc32fast::hash(buf)) {
            return Err(MemoryFileError::BadChunk {
                path: self.path.clone(),
                chunk: i,
                gpa,
            });
        }
        Ok(())
    }

    /// Verifies every chunk.
    pub fn verify_all(&self) -> Result<(), MemoryFileError> {
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for (i, (gpa, len)) in self.chunks().into_iter().enumerate() {
            self.read_verified(i, gpa, &mut buf[..len as usize])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("snapvm-memfile-{name}-{}", std::process::id()))
    }

    fn sample(path: &Path) -> Vec<Region> {
        let regions = vec![(0, 3 * CHUNK_SIZE + 8192), (8 * CHUNK_SIZE, CHUNK_SIZE)];
        let w = MemoryFileWriter::create(path, &regions).unwrap();
        w.write_at(&[0xab; 4096], 4096).unwrap();
        w.write_at(&[0xcd; 4096], 8 * CHUNK_SIZE + 8192).unwrap();
        let on_disk = w.finish().unwrap();
        assert!(on_disk < 1 << 20, "zero pages are holes: {on_disk}");
        regions
    }

    /// A damaged trailer or footer (the parts a reader trusts to find the
    /// rest), or page data: refused naming the file, or read and verified,
    /// never a panic or an out-of-bounds read.
    #[test]
    fn fuzz_trailer_footer_and_data() {
        use std::os::unix::fs::FileExt;
        let p = tmp("fuzz");
        let regions = vec![(0, 2 * CHUNK_SIZE), (4 * CHUNK_SIZE, 4096)];
        let w = MemoryFileWriter::create(&p, &regions).unwrap();
        w.write_at(&[0x11; 4096], 8192).unwrap();
        w.finish().unwrap();
        let valid = std::fs::read(&p).unwrap();
        let data_end = 4 * CHUNK_SIZE as usize + 4096;
        let tail = valid[data_end..].to_vec();
        fuzzing::run("memory.bin", 1500, 256, |u| {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(data_end as u64).unwrap();
            f.write_all_at(&[0u8; 4096], 8192).unwrap();
            f.write_all_at(&[0x11; 4096], 8192).unwrap();
            if u.arbitrary()? {
                let at = u.int_in_range(0..=data_end as u64 - 1)?;
                f.write_all_at(&[u.arbitrary::<u8>()? | 1], at).unwrap();
            }
            let t = if u.arbitrary()? {
                fuzzing::mutate(&tail, u)?
            } else {
                tail.clone()
            };
            f.write_all_at(&t, data_end as u64).unwrap();
            match MemoryFile::open(&p) {
                Ok(m) => {
                    let _ = m.check_layout(&regions);
                    let _ = m.verify_all();
                }
                Err(e) => assert!(
                    e.to_string().contains("memory.bin")
                        || e.to_string().contains(&p.display().to_string()),
                    "{e}"
                ),
            }
            Ok(())
        });
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn round_trip() {
        let p = tmp("rt");
        let regions = sample(&p);
        let m = MemoryFile::open(&p).unwrap();
        assert_eq!(m.regions(), &regions[..]);
        m.check_layout(&regions).unwrap();
        m.verify_all().unwrap();
        let mut b = vec![0u8; CHUNK_SIZE as usize];
        m.read_chunk(0, &mut b).unwrap();
        assert_eq!(&b[4096..8192], &[0xab; 4096][..]);
        assert!(b[..4096].iter().all(|x| *x == 0));
        assert_eq!(m.chunks().len(), 5);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let p = tmp("corrupt");
        let regions = sample(&p);
        let good = std::fs::read(&p).unwrap();
        let check = |data: &[u8], want: &str| {
            std::fs::write(&p, data).unwrap();
            let e = match MemoryFile::open(&p) {
                Err(e) => e.to_string(),
                Ok(m) => m.verify_all().unwrap_err().to_string(),
            };
            assert!(
                e.contains(want) && e.contains("snapvm-memfile-corrupt"),
                "{want}: {e}"
            );
        };
        let mut flip = good.clone();
        flip[4096 + 100] ^= 1;
        check(&flip, "corrupt memory data in chunk 0");
        let mut flip = good.clone();
        let n = flip.len();
        flip[n - FOOTER_LEN as usize - 10] ^= 1;
        check(&flip, "corrupt memory file trailer");
        check(&good[..good.len() - 1000], "bad magic");
        check(&good[..10], "truncated");
        let mut ver = good.clone();
        ver[n - FOOTER_LEN as usize + 8] = 9;
        check(&ver, "unsupported memory file version 9");
        let mut magic = good.clone();
        magic[n - FOOTER_LEN as usize] = b'X';
        check(&magic, "bad magic");
        std::fs::write(&p, &good).unwrap();
        let m = MemoryFile::open(&p).unwrap();
        assert!(m.check_layout(&[(0, 4096)]).is_err());
        let _ = regions;
        std::fs::remove_file(&p).unwrap();
    }
}
