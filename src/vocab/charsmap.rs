//! SentencePiece's precompiled character map (the `nmt_nfkc` and similar normalizers): a
//! Darts-clone double-array trie from input byte strings to offsets of NUL-terminated
//! replacement strings. Blob layout: `u32 LE trie size in bytes | trie units (u32 LE) | strings`.
//! Only reading is needed: the map ships inside the model file.

use anyhow::{Result, bail};

pub struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    pub fn parse(blob: &[u8]) -> Result<Self> {
        if blob.len() <= 4 {
            bail!("precompiled_charsmap is broken (too short)");
        }
        let trie_size = u32::from_le_bytes(blob[..4].try_into().unwrap()) as usize;
        if trie_size > blob.len() - 4 || !trie_size.is_multiple_of(4) {
            bail!("precompiled_charsmap is broken (trie size {trie_size})");
        }
        let units = blob[4..4 + trie_size]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>();
        if units.is_empty() {
            bail!("precompiled_charsmap is broken (empty trie)");
        }
        Ok(CharsMap {
            units,
            normalized: blob[4 + trie_size..].to_vec(),
        })
    }

    #[inline]
    fn offset(u: u32) -> usize {
        ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize
    }

    /// The longest key that is a prefix of `key`: (its length in bytes, its replacement).
    pub fn longest_prefix(&self, key: &[u8]) -> Option<(usize, &str)> {
        let mut pos = Self::offset(self.units[0]);
        let mut best = None;
        for (i, &b) in key.iter().enumerate() {
            pos ^= b as usize;
            let Some(&u) = self.units.get(pos) else {
                break;
            };
            // label(): the byte this unit was reached by (bit 31 marks a leaf unit).
            if u & ((1 << 31) | 0xff) != u32::from(b) {
                break;
            }
            pos ^= Self::offset(u);
            if (u >> 8) & 1 == 1 {
                let Some(&leaf) = self.units.get(pos) else {
                    break;
                };
                best = Some((i + 1, (leaf & 0x7fff_ffff) as usize));
            }
        }
        let (len, at) = best?;
        let rest = self.normalized.get(at..)?;
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        let s = std::str::from_utf8(&rest[..end]).ok()?;
        Some((len, s))
    }
}
