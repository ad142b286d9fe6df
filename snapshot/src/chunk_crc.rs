//! memory.bin's chunk checksums computed from the data as it is written, so
//! finishing a snapshot does not read the whole file back.
//!
//! A live snapshot writes each page once, but not in order: the streaming
//! thread goes chunk by chunk, the write-fault handler's pages arrive
//! whenever the guest touches them, and zero pages are never written (holes).
//! Each write is recorded as a piece (offset, length, CRC-32 of its bytes);
//! a chunk's CRC-32 is then the pieces' CRCs combined in file order with
//! those of the zero runs between them (crc32fast's `combine`, a few
//! microseconds each, so a chunk costs its number of pieces, not its
//! length). A chunk whose pieces overlap or cross its boundary is read back
//! from the file instead (the caller's fallback), so a writer that does
//! something unexpected costs time, never a wrong checksum.

use std::collections::HashMap;
use std::sync::Mutex;

use crc32fast::Hasher;

/// One write: file offset, length, CRC-32.
type Piece = (u64, u64, u32);

/// The pieces written so far, from any thread.
#[derive(Debug, Default)]
pub struct ChunkCrcs {
    pieces: Mutex<Vec<Piece>>,
}

impl ChunkCrcs {
    /// Records that `data` was written at file offset `offset`.
    pub fn record(&self, offset: u64, data: &[u8]) {
        let crc = crc32fast::hash(data);
        self.pieces.lock().unwrap_or_else(|e| e.into_inner()).push((
            offset,
            data.len() as u64,
            crc,
        ));
    }

    /// The CRC-32 of each chunk `(offset, len)` of `chunks` (in file
    /// order, not overlapping), or `None` for a chunk the pieces do not
    /// describe exactly (to be read back).
    pub fn finish(self, chunks: &[(u64, u64)]) -> Vec<Option<u32>> {
        let mut pieces = self.pieces.into_inner().unwrap_or_else(|e| e.into_inner());
        pieces.sort_unstable_by_key(|p| p.0);
        let mut zeros = ZeroCrcs::default();
        let mut next = 0;
        // The furthest end of any piece taken so far: a piece reaching into
        // a chunk from before it makes that chunk unknown too.
        let mut reach = 0;
        let mut out = Vec::with_capacity(chunks.len());
        for &(start, len) in chunks {
            let end = start + len;
            // Pieces before this chunk that no chunk took (between regions).
            while next < pieces.len() && pieces[next].0 < start {
                reach = reach.max(pieces[next].0 + pieces[next].1);
                next += 1;
            }
            let mut h = Hasher::new();
            let mut at = start;
            let mut ok = reach <= start;
            while next < pieces.len() && pieces[next].0 < end {
                let (off, n, crc) = pieces[next];
                reach = reach.max(off + n);
                next += 1;
                if !ok || off < at || off + n > end {
                    ok = false; // overlapping, or across the boundary
                    continue;
                }
                if off > at {
                    h.combine(&zeros.of(off - at));
                }
                h.combine(&Hasher::new_with_initial_len(crc, n));
                at = off + n;
            }
            if !ok {
                out.push(None);
                continue;
            }
            if at < end {
                h.combine(&zeros.of(end - at));
            }
            out.push(Some(h.finalize()));
        }
        out
    }
}

/// CRC-32 states of runs of zero bytes, by length (holes repeat lengths).
#[derive(Default)]
struct ZeroCrcs(HashMap<u64, u32>);

impl ZeroCrcs {
    fn of(&mut self, len: u64) -> Hasher {
        let crc = *self.0.entry(len).or_insert_with(|| {
            const BUF: usize = 64 << 10;
            static ZERO: [u8; BUF] = [0; BUF];
            let mut h = Hasher::new();
            let mut left = len;
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                h.update(&ZERO[..n]);
                left -= n as u64;
            }
            h.finalize()
        });
        Hasher::new_with_initial_len(crc, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks of `file` hashed whole: what the checksums must equal.
    fn whole(file: &[u8], chunks: &[(u64, u64)]) -> Vec<Option<u32>> {
        chunks
            .iter()
            .map(|&(s, l)| Some(crc32fast::hash(&file[s as usize..(s + l) as usize])))
            .collect()
    }

    #[test]
    fn pieces_in_any_order_with_holes_give_the_whole_chunk_crcs() {
        let chunks = [(0u64, 16384u64), (16384, 16384), (40960, 8192)];
        let mut file = vec![0u8; 49152];
        let c = ChunkCrcs::default();
        // Written out of order, with holes, one piece ending a chunk.
        let writes: [(u64, usize, u8); 5] = [
            (20480, 4096, 7),
            (0, 8192, 1),
            (12288, 4096, 3),
            (45056, 4096, 9),
            (28672, 4096, 5),
        ];
        for (off, n, v) in writes {
            let data = vec![v; n];
            file[off as usize..off as usize + n].copy_from_slice(&data);
            c.record(off, &data);
        }
        assert_eq!(c.finish(&chunks), whole(&file, &chunks));
    }

    #[test]
    fn an_untouched_chunk_is_the_crc_of_zeros() {
        let chunks = [(0u64, 2 << 20)];
        let file = vec![0u8; 2 << 20];
        assert_eq!(ChunkCrcs::default().finish(&chunks), whole(&file, &chunks));
    }

    #[test]
    fn overlapping_or_crossing_pieces_are_left_to_a_read_back() {
        let chunks = [(0u64, 8192u64), (8192, 8192), (16384, 8192)];
        let c = ChunkCrcs::default();
        c.record(0, &[1; 4096]);
        c.record(2048, &[2; 4096]); // overlaps in chunk 0
        c.record(12288, &[3; 8192]); // crosses from chunk 1 into 2
        let got = c.finish(&chunks);
        assert_eq!(got[0], None);
        assert_eq!(got[1], None);
        // Chunk 2 starts inside the crossing piece: also unknown.
        assert_eq!(got[2], None);
    }

    #[test]
    fn fuzz_against_hashing_the_whole_file() {
        fuzzing::run("chunk checksums", 300, 512, |u| {
            let page = 4096u64;
            let chunk = page * u.int_in_range(1..=4)?;
            let nchunks = u.int_in_range(1..=4)?;
            let size = chunk * nchunks;
            let chunks: Vec<(u64, u64)> = (0..nchunks).map(|i| (i * chunk, chunk)).collect();
            let mut file = vec![0u8; size as usize];
            let c = ChunkCrcs::default();
            let mut pages: Vec<u64> = (0..size / page).collect();
            // Each page written at most once, in a random order.
            for i in (1..pages.len()).rev() {
                let j = u.int_in_range(0..=i)?;
                pages.swap(i, j);
            }
            for p in pages {
                if u.arbitrary::<bool>()? {
                    let v: u8 = u.arbitrary()?;
                    let data = vec![v; page as usize];
                    file[(p * page) as usize..((p + 1) * page) as usize].copy_from_slice(&data);
                    c.record(p * page, &data);
                }
            }
            assert_eq!(c.finish(&chunks), whole(&file, &chunks));
            Ok(())
        });
    }
}
