//! The deterministic byte pattern used for large transfers: byte `i` of a body is
//! `(i % 251) as u8`. Generation and verification work on slices of a pre-computed table so
//! that they run at memcpy/memcmp speed even in unoptimised test builds.

use std::sync::OnceLock;

/// Period of the pattern (prime, so it never lines up with power-of-two chunk sizes).
pub const PERIOD: usize = 251;

/// A table of `PERIOD * 263` pattern bytes, so that any offset `o < PERIOD` still leaves at
/// least 65 762 (> 64 KiB) bytes of contiguous pattern after it.
pub fn table() -> &'static [u8] {
    // NB: `CHUNK` below relies on `table().len() - (PERIOD - 1) >= CHUNK`.
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| (0..PERIOD * 263).map(|i| (i % PERIOD) as u8).collect())
}

/// Byte `i` of the pattern.
pub fn byte_at(i: u64) -> u8 {
    (i % PERIOD as u64) as u8
}

/// Fill `buf` with the pattern bytes starting at absolute position `pos`.
pub fn fill(buf: &mut [u8], pos: u64) {
    let t = table();
    let mut done = 0usize;
    let mut p = pos;
    while done < buf.len() {
        let off = (p % PERIOD as u64) as usize;
        let n = (buf.len() - done).min(t.len() - off);
        buf[done..done + n].copy_from_slice(&t[off..off + n]);
        done += n;
        p += n as u64;
    }
}

/// A pattern body of `len` bytes (only for small bodies).
pub fn bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, 0);
    v
}

/// Incremental verifier: feed the body chunk by chunk; `ok()` says whether every byte so far
/// matched the pattern.
#[derive(Debug, Clone, Default)]
pub struct Checker {
    pos: u64,
    ok: bool,
    first_mismatch: Option<u64>,
}

impl Checker {
    pub fn new() -> Self {
        Checker {
            pos: 0,
            ok: true,
            first_mismatch: None,
        }
    }

    pub fn update(&mut self, mut chunk: &[u8]) {
        let t = table();
        while !chunk.is_empty() {
            let off = (self.pos % PERIOD as u64) as usize;
            let n = chunk.len().min(t.len() - off);
            if self.ok && chunk[..n] != t[off..off + n] {
                self.ok = false;
                let i = chunk[..n]
                    .iter()
                    .zip(&t[off..off + n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_mismatch = Some(self.pos + i as u64);
            }
            self.pos += n as u64;
            chunk = &chunk[n..];
        }
    }

    pub fn len(&self) -> u64 {
        self.pos
    }

    pub fn ok(&self) -> bool {
        self.ok
    }

    pub fn first_mismatch(&self) -> Option<u64> {
        self.first_mismatch
    }
}

/// Chunk size used by the fake's downloads.
pub const CHUNK: usize = 64 * 1024;

/// A `'static` slice of `len <= CHUNK` pattern bytes starting at absolute position `pos`.
pub fn static_chunk(pos: u64, len: usize) -> &'static [u8] {
    assert!(len <= CHUNK);
    let off = (pos % PERIOD as u64) as usize;
    &table()[off..off + len]
}
