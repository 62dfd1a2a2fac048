//! Token shard files: a 64-byte header (magic, version, kind, token width, vocab size, block size,
//! counts) followed by little-endian payload, read back through a memory map.
//!
//! Two kinds share the header:
//! - **blocks** (pre-training): `records` blocks of exactly `block_size` tokens, back to back.
//! - **examples** (SFT): `records + 1` u64 offsets, `records` u32 source lengths, then the tokens of
//!   every example back to back (example `i` is `tokens[offsets[i]..offsets[i+1]]`). Labels are not
//!   stored: `labels[j] = -100` for `j < source_len`, else `input_ids[j]` — exactly the recipe's
//!   `([-100]*len(src) + tgt)[:max_len]` next to `(src + tgt)[:max_len]`.
//!
//! Tokens are u16 when every id fits (`vocab_size <= 65536`), else u32. The file size must equal
//! what the header implies, so a truncated or foreign file is rejected on open.
//!
//! Version 2 (written since) adds checksums: the header's last 4 bytes are the crc32 of its first
//! 60, and the payload (everything after the header) is followed by a table of one crc32 per
//! [`CHECKSUM_CHUNK`]-byte chunk of it (the last chunk may be shorter); header bytes 28..32 hold
//! the chunk size and 48..52 the crc32 of the table (a digest of the whole payload, which the data
//! manifests record). Every chunk is verified at open, in parallel: one pass over the file, which
//! a training run reads whole anyway, and a damaged byte is named by its offset and the blocks or
//! examples it belongs to before any step runs. Version 1 files (no checksums) are still read.

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"ZHLTOKS\0";
/// The version this build writes; bumped on any layout change.
pub const VERSION: u32 = 2;
/// The oldest version this build still reads (version 1: no checksums).
pub const OLDEST_READ_VERSION: u32 = 1;
/// Payload bytes per checksum (version 2): small enough that a damaged byte is placed within a
/// few blocks, large enough that the table is 1/16384 of the payload.
pub const CHECKSUM_CHUNK: u32 = 1 << 16;
/// Header size in bytes (the payload starts here, 8-byte aligned).
pub const HEADER_LEN: usize = 64;

/// What the payload holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardKind {
    /// Fixed-length pre-training blocks.
    Blocks = 1,
    /// Variable-length SFT examples with offsets and source lengths.
    Examples = 2,
}

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: ShardKind,
    /// 2 (u16) or 4 (u32).
    pub token_bytes: u32,
    pub vocab_size: u32,
    /// Block length (blocks) or the truncation length (examples).
    pub block_size: u32,
    /// Blocks or examples.
    pub records: u64,
    /// Tokens in the payload.
    pub tokens: u64,
    /// The format version the file was written with.
    pub version: u32,
    /// Version 2: the crc32 of the payload checksum table, a digest of the whole payload.
    pub payload_digest: Option<u32>,
}

/// Token width for a vocabulary: u16 when every id fits.
pub fn token_bytes_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 { 2 } else { 4 }
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[28..32].copy_from_slice(&CHECKSUM_CHUNK.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_digest.unwrap_or(0).to_le_bytes());
        b[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.token_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.block_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.records.to_le_bytes());
        b[40..48].copy_from_slice(&self.tokens.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Header> {
        ensure!(
            b.len() >= HEADER_LEN,
            "not a zhllama token shard: {} bytes, shorter than the {HEADER_LEN}-byte header",
            b.len()
        );
        ensure!(
            b[0..8] == MAGIC,
            "not a zhllama token shard (bad magic {:02x?})",
            &b[0..8]
        );
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        ensure!(
            (OLDEST_READ_VERSION..=VERSION).contains(&version),
            "token shard version {version}, this build reads versions {OLDEST_READ_VERSION} to \
             {VERSION}"
        );
        if version >= 2 {
            let (want, have) = (u32_at(60), crc32fast::hash(&b[..60]));
            ensure!(
                want == have,
                "header checksum mismatch (stored {want:08x}, computed {have:08x}): the header \
                 is damaged"
            );
            ensure!(
                u32_at(28) == CHECKSUM_CHUNK,
                "checksum chunk of {} bytes, this build writes and reads {CHECKSUM_CHUNK}",
                u32_at(28)
            );
        }
        let kind = match u32_at(12) {
            1 => ShardKind::Blocks,
            2 => ShardKind::Examples,
            k => bail!("unknown token shard kind {k}"),
        };
        let token_bytes = u32_at(16);
        ensure!(
            token_bytes == 2 || token_bytes == 4,
            "bad token width {token_bytes} bytes"
        );
        let h = Header {
            kind,
            token_bytes,
            vocab_size: u32_at(20),
            block_size: u32_at(24),
            records: u64_at(32),
            tokens: u64_at(40),
            version,
            payload_digest: (version >= 2).then(|| u32_at(48)),
        };
        ensure!(
            h.token_bytes == token_bytes_for(h.vocab_size as usize),
            "token width {} does not match vocab size {}",
            h.token_bytes,
            h.vocab_size
        );
        Ok(h)
    }

    /// Byte offset of the token payload.
    fn tokens_offset(&self) -> Option<u64> {
        match self.kind {
            ShardKind::Blocks => Some(HEADER_LEN as u64),
            ShardKind::Examples => (self.records.checked_add(1)?)
                .checked_mul(8)?
                .checked_add(self.records.checked_mul(4)?)?
                .checked_add(HEADER_LEN as u64),
        }
    }

    /// The end of the payload (None on overflow: a corrupt header).
    fn payload_end(&self) -> Option<u64> {
        self.tokens_offset()?
            .checked_add(self.tokens.checked_mul(self.token_bytes as u64)?)
    }

    /// Payload checksums in the table (0 for version 1).
    fn checksum_chunks(&self) -> Option<u64> {
        if self.version < 2 {
            return Some(0);
        }
        Some((self.payload_end()? - HEADER_LEN as u64).div_ceil(CHECKSUM_CHUNK as u64))
    }

    /// The exact file size this header implies (None on overflow: a corrupt header).
    fn file_len(&self) -> Option<u64> {
        self.payload_end()?
            .checked_add(self.checksum_chunks()?.checked_mul(4)?)
    }
}

/// How manifests write a payload digest.
pub fn digest_string(d: u32) -> String {
    format!("crc32:{d:08x}")
}

/// A shard's payload digest against the one its manifest (in `dir`) records for `name`: both
/// absent (version 1 data) or equal.
pub fn check_digest(
    h: &Header,
    recorded: &std::collections::BTreeMap<String, String>,
    dir: &Path,
    name: &str,
) -> Result<()> {
    let have = h.payload_digest.map(digest_string);
    let want = recorded.get(name).cloned();
    ensure!(
        have == want,
        "{}: payload digest {} but {} records {}: the shard is not the one this manifest describes",
        dir.join(name).display(),
        have.as_deref().unwrap_or("none (version 1)"),
        dir.join("manifest.json").display(),
        want.as_deref().unwrap_or("none")
    );
    Ok(())
}

/// Token ids stored at their on-disk width.
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Tokens<'_> {
    pub fn len(&self) -> usize {
        match self {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Id `i` widened to u32.
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Tokens::U16(t) => t[i] as u32,
            Tokens::U32(t) => t[i],
        }
    }
    /// `out = self` widened to u32 (`out.len()` must equal `self.len()`).
    pub fn copy_to(&self, out: &mut [u32]) {
        assert_eq!(out.len(), self.len(), "copy_to: length mismatch");
        match self {
            Tokens::U16(t) => out
                .iter_mut()
                .zip(t.iter())
                .for_each(|(o, &v)| *o = v as u32),
            Tokens::U32(t) => out.copy_from_slice(t),
        }
    }
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = vec![0u32; self.len()];
        self.copy_to(&mut v);
        v
    }
}

/// A memory-mapped shard with its header checked against the file size.
pub struct ShardFile {
    path: PathBuf,
    header: Header,
    map: Mmap,
}

impl ShardFile {
    /// Open and validate `path`; `kind` must match the header. Version 2 payloads are verified
    /// against their checksums.
    pub fn open(path: &Path, kind: ShardKind) -> Result<ShardFile> {
        Self::open_with(path, kind, true)
    }

    /// [`ShardFile::open`], verifying the payload checksums only when `verify` (the header's own
    /// checksum and every size check always run). Unverified opening exists to measure what the
    /// verification costs (`benches/shard.rs`).
    pub fn open_with(path: &Path, kind: ShardKind, verify: bool) -> Result<ShardFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the shard is opened read-only and never modified while mapped by us; writers
        // create shards under a temporary name and rename them into place.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let header = Header::decode(&map).with_context(|| format!("{}", path.display()))?;
        ensure!(
            header.kind == kind,
            "{}: token shard holds {:?}, expected {:?}",
            path.display(),
            header.kind,
            kind
        );
        let want = header
            .file_len()
            .with_context(|| format!("{}: corrupt header (sizes overflow)", path.display()))?;
        let have = map.len() as u64;
        ensure!(
            have == want,
            "{}: {} token shard: header implies {want} bytes, file has {have}",
            path.display(),
            if have < want {
                "truncated"
            } else {
                "oversized"
            }
        );
        if kind == ShardKind::Blocks {
            ensure!(
                header.block_size > 0 && header.records * header.block_size as u64 == header.tokens,
                "{}: corrupt header: {} blocks of {} != {} tokens",
                path.display(),
                header.records,
                header.block_size,
                header.tokens
            );
        }
        let shard = ShardFile {
            path: path.to_path_buf(),
            header,
            map,
        };
        if verify {
            shard.verify_payload()?;
        }
        if kind == ShardKind::Examples {
            shard.check_offsets()?;
        }
        Ok(shard)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tokens of the payload.
    pub fn tokens(&self) -> Tokens<'_> {
        let off = self.header.tokens_offset().unwrap() as usize;
        let bytes = &self.map[off..self.header.payload_end().unwrap() as usize];
        // The map is page-aligned and `off` is a multiple of 4, so the casts cannot fail.
        match self.header.token_bytes {
            2 => Tokens::U16(bytemuck::cast_slice(bytes)),
            _ => Tokens::U32(bytemuck::cast_slice(bytes)),
        }
    }

    fn offsets(&self) -> &[u64] {
        let n = self.header.records as usize + 1;
        bytemuck::cast_slice(&self.map[HEADER_LEN..HEADER_LEN + 8 * n])
    }

    fn source_lens(&self) -> &[u32] {
        let start = HEADER_LEN + 8 * (self.header.records as usize + 1);
        bytemuck::cast_slice(&self.map[start..start + 4 * self.header.records as usize])
    }

    /// Check every payload chunk against the table (version 2; version 1 has none). The first
    /// damaged chunk is named by its byte range and what it holds.
    fn verify_payload(&self) -> Result<()> {
        use rayon::prelude::*;
        let n = self.header.checksum_chunks().unwrap() as usize;
        if n == 0 {
            return Ok(());
        }
        let end = self.header.payload_end().unwrap() as usize;
        let table = &self.map[end..end + 4 * n];
        let digest = crc32fast::hash(table);
        let chunk = CHECKSUM_CHUNK as usize;
        let bad = (0..n).into_par_iter().find_first(|&i| {
            let a = HEADER_LEN + i * chunk;
            let b = (a + chunk).min(end);
            let want = u32::from_le_bytes(table[4 * i..4 * i + 4].try_into().unwrap());
            crc32fast::hash(&self.map[a..b]) != want
        });
        if let Some(i) = bad {
            let a = HEADER_LEN + i * chunk;
            let b = (a + chunk).min(end);
            bail!(
                "{}: payload checksum mismatch in bytes {a}..{b} ({}): the file is damaged",
                self.path.display(),
                self.describe_bytes(a as u64, b as u64)
            );
        }
        ensure!(
            Some(digest) == self.header.payload_digest,
            "{}: the payload checksum table is damaged (digest {digest:08x}, header says {:08x})",
            self.path.display(),
            self.header.payload_digest.unwrap_or(0)
        );
        Ok(())
    }

    /// What the payload bytes `a..b` hold, in records: "blocks i..=j", "examples i..=j" or the
    /// example tables.
    fn describe_bytes(&self, a: u64, b: u64) -> String {
        let h = &self.header;
        let tok0 = h.tokens_offset().unwrap();
        if a < tok0 {
            return "the example offsets and source-length tables".into();
        }
        let w = h.token_bytes as u64;
        let (t0, t1) = ((a - tok0) / w, (b - tok0).div_ceil(w).max(1) - 1);
        match h.kind {
            ShardKind::Blocks => {
                let bs = h.block_size as u64;
                format!("blocks {}..={} of {bs} tokens", t0 / bs, t1 / bs)
            }
            ShardKind::Examples => {
                // The offsets were size-checked at open but not yet validated: clamp the search.
                let offs = self.offsets();
                let ex = |t: u64| offs.partition_point(|&o| o <= t).saturating_sub(1);
                format!("examples {}..={}", ex(t0), ex(t1))
            }
        }
    }

    fn check_offsets(&self) -> Result<()> {
        let offs = self.offsets();
        let lens = self.source_lens();
        ensure!(
            offs[0] == 0 && *offs.last().unwrap() == self.header.tokens,
            "{}: corrupt example offsets (first {}, last {}, tokens {})",
            self.path.display(),
            offs[0],
            offs.last().unwrap(),
            self.header.tokens
        );
        for (i, w) in offs.windows(2).enumerate() {
            ensure!(
                w[0] <= w[1] && (lens[i] as u64) <= w[1] - w[0],
                "{}: corrupt example {i}: offsets {}..{}, source length {}",
                self.path.display(),
                w[0],
                w[1],
                lens[i]
            );
        }
        Ok(())
    }
}

/// crc32 of every [`CHECKSUM_CHUNK`]-byte chunk of a byte stream, fed in pieces of any size.
struct ChunkSums {
    cur: crc32fast::Hasher,
    in_cur: usize,
    sums: Vec<u32>,
}

impl ChunkSums {
    fn new() -> ChunkSums {
        ChunkSums {
            cur: crc32fast::Hasher::new(),
            in_cur: 0,
            sums: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        let chunk = CHECKSUM_CHUNK as usize;
        while !bytes.is_empty() {
            let take = (chunk - self.in_cur).min(bytes.len());
            self.cur.update(&bytes[..take]);
            self.in_cur += take;
            bytes = &bytes[take..];
            if self.in_cur == chunk {
                let h = std::mem::replace(&mut self.cur, crc32fast::Hasher::new());
                self.sums.push(h.finalize());
                self.in_cur = 0;
            }
        }
    }

    /// The table (little-endian crc32s, the short last chunk included).
    fn finish(mut self) -> Vec<u8> {
        if self.in_cur > 0 {
            self.sums.push(self.cur.finalize());
        }
        self.sums.iter().flat_map(|c| c.to_le_bytes()).collect()
    }
}

/// Appends records to `<path>` through a temporary file; `finish` patches the header, syncs and
/// renames. Dropping an unfinished writer removes the temporary file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    header: Header,
    /// Examples only: offsets and source lengths, written after the tokens are known.
    offsets: Vec<u64>,
    source_lens: Vec<u32>,
    /// Examples only: tokens spooled to a second temporary file (the offsets table precedes them).
    spool: Option<(PathBuf, BufWriter<File>)>,
    /// Checksums of the payload as it is written (blocks; examples sum theirs in `finish`).
    sums: ChunkSums,
    finished: bool,
}

impl ShardWriter {
    /// A writer of `kind` records into `path`.
    pub fn create(
        path: &Path,
        kind: ShardKind,
        vocab_size: usize,
        block_size: usize,
    ) -> Result<ShardWriter> {
        ensure!(
            vocab_size > 0 && vocab_size <= u32::MAX as usize,
            "bad vocab size {vocab_size}"
        );
        let tmp = crate::util::temp_path(path);
        let mut out = BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        out.write_all(&[0u8; HEADER_LEN])
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let spool = if kind == ShardKind::Examples {
            let sp = tmp.with_extension("tokens");
            let f = File::create(&sp).with_context(|| format!("cannot create {}", sp.display()))?;
            Some((sp, BufWriter::with_capacity(1 << 20, f)))
        } else {
            None
        };
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            header: Header {
                kind,
                token_bytes: token_bytes_for(vocab_size),
                vocab_size: vocab_size as u32,
                block_size: block_size as u32,
                records: 0,
                tokens: 0,
                version: VERSION,
                payload_digest: None,
            },
            offsets: vec![0],
            source_lens: Vec::new(),
            spool,
            sums: ChunkSums::new(),
            finished: false,
        })
    }

    /// Write `ids` at `width`, feeding the bytes to `sums` when given.
    fn write_tokens(
        w: &mut BufWriter<File>,
        sums: Option<&mut ChunkSums>,
        width: u32,
        vocab: u32,
        ids: &[u32],
    ) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} out of range for vocab size {vocab}");
        }
        let v: Vec<u16>;
        let bytes: &[u8] = if width == 2 {
            v = ids.iter().map(|&t| t as u16).collect();
            bytemuck::cast_slice(&v)
        } else {
            bytemuck::cast_slice(ids)
        };
        w.write_all(bytes)?;
        if let Some(s) = sums {
            s.update(bytes);
        }
        Ok(())
    }

    /// Append one pre-training block (exactly `block_size` ids).
    pub fn push_block(&mut self, ids: &[u32]) -> Result<()> {
        ensure!(
            self.header.kind == ShardKind::Blocks,
            "push_block on an examples shard"
        );
        ensure!(
            ids.len() == self.header.block_size as usize,
            "block of {} tokens, expected {}",
            ids.len(),
            self.header.block_size
        );
        let (w, v) = (self.header.token_bytes, self.header.vocab_size);
        Self::write_tokens(self.out.as_mut().unwrap(), Some(&mut self.sums), w, v, ids)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.header.records += 1;
        self.header.tokens += ids.len() as u64;
        Ok(())
    }

    /// Append one SFT example: its input ids and how many leading ids are source (label -100).
    pub fn push_example(&mut self, input_ids: &[u32], source_len: usize) -> Result<()> {
        ensure!(
            self.header.kind == ShardKind::Examples,
            "push_example on a blocks shard"
        );
        ensure!(
            source_len <= input_ids.len(),
            "source length {source_len} > example length {}",
            input_ids.len()
        );
        let (w, v) = (self.header.token_bytes, self.header.vocab_size);
        let (sp_path, sp) = self.spool.as_mut().unwrap();
        Self::write_tokens(sp, None, w, v, input_ids)
            .with_context(|| format!("writing {}", sp_path.display()))?;
        self.header.records += 1;
        self.header.tokens += input_ids.len() as u64;
        self.offsets.push(self.header.tokens);
        self.source_lens.push(source_len as u32);
        Ok(())
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.header.records
    }

    /// Write the header (and the example tables), fsync and rename into place.
    pub fn finish(mut self) -> Result<Header> {
        let mut out = self.out.take().unwrap();
        let ctx = || format!("writing {}", self.tmp.display());
        if let Some((sp_path, sp)) = self.spool.take() {
            let f = sp
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(ctx)?;
            drop(f);
            for table in [
                bytemuck::cast_slice::<u64, u8>(&self.offsets),
                bytemuck::cast_slice::<u32, u8>(&self.source_lens),
            ] {
                out.write_all(table).with_context(ctx)?;
                self.sums.update(table);
            }
            let mut src = File::open(&sp_path)
                .with_context(|| format!("cannot open {}", sp_path.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut src, &mut buf)
                    .with_context(|| format!("cannot read {}", sp_path.display()))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).with_context(ctx)?;
                self.sums.update(&buf[..n]);
            }
            std::fs::remove_file(&sp_path).ok();
        }
        let table = std::mem::replace(&mut self.sums, ChunkSums::new()).finish();
        out.write_all(&table).with_context(ctx)?;
        self.header.payload_digest = Some(crc32fast::hash(&table));
        let mut f = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(ctx)?;
        f.seek(SeekFrom::Start(0)).with_context(ctx)?;
        f.write_all(&self.header.encode()).with_context(ctx)?;
        f.sync_all().with_context(ctx)?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        })?;
        self.finished = true;
        Ok(self.header)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if !self.finished {
            std::fs::remove_file(&self.tmp).ok();
            if let Some((p, _)) = &self.spool {
                std::fs::remove_file(p).ok();
            }
        }
    }
}

/// Fixed-length blocks of one split, random access by index.
pub struct BlockShard {
    file: ShardFile,
}

impl BlockShard {
    pub fn open(path: &Path) -> Result<BlockShard> {
        Self::open_with(path, true)
    }
    /// Open, verifying the payload checksums only when `verify` (see [`ShardFile::open_with`]).
    pub fn open_with(path: &Path, verify: bool) -> Result<BlockShard> {
        Ok(BlockShard {
            file: ShardFile::open_with(path, ShardKind::Blocks, verify)?,
        })
    }
    pub fn len(&self) -> usize {
        self.file.header.records as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn block_size(&self) -> usize {
        self.file.header.block_size as usize
    }
    pub fn vocab_size(&self) -> usize {
        self.file.header.vocab_size as usize
    }
    pub fn header(&self) -> &Header {
        self.file.header()
    }
    /// Block `i` at its stored width (panics if `i >= len()`).
    pub fn block(&self, i: usize) -> Tokens<'_> {
        let bs = self.block_size();
        assert!(i < self.len(), "block {i} of {}", self.len());
        match self.file.tokens() {
            Tokens::U16(t) => Tokens::U16(&t[i * bs..(i + 1) * bs]),
            Tokens::U32(t) => Tokens::U32(&t[i * bs..(i + 1) * bs]),
        }
    }
    /// `out = block i` as u32 (`out.len() == block_size`).
    pub fn read_block(&self, i: usize, out: &mut [u32]) {
        self.block(i).copy_to(out)
    }
}

/// Variable-length SFT examples, random access by index.
pub struct ExampleShard {
    file: ShardFile,
}

/// One SFT example as stored.
pub struct Example<'a> {
    pub input_ids: Tokens<'a>,
    /// Leading ids that are prompt (label -100).
    pub source_len: usize,
}

impl Example<'_> {
    /// The recipe's labels: -100 on the source, the id elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        (0..self.input_ids.len())
            .map(|j| {
                if j < self.source_len {
                    crate::data::IGNORE_INDEX
                } else {
                    self.input_ids.get(j) as i64
                }
            })
            .collect()
    }
}

impl ExampleShard {
    pub fn open(path: &Path) -> Result<ExampleShard> {
        Ok(ExampleShard {
            file: ShardFile::open(path, ShardKind::Examples)?,
        })
    }
    pub fn len(&self) -> usize {
        self.file.header.records as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn header(&self) -> &Header {
        self.file.header()
    }
    /// The truncation length the examples were built with.
    pub fn max_len(&self) -> usize {
        self.file.header.block_size as usize
    }
    pub fn vocab_size(&self) -> usize {
        self.file.header.vocab_size as usize
    }
    /// Example `i` (panics if `i >= len()`).
    pub fn example(&self, i: usize) -> Example<'_> {
        let offs = self.file.offsets();
        let (a, b) = (offs[i] as usize, offs[i + 1] as usize);
        let input_ids = match self.file.tokens() {
            Tokens::U16(t) => Tokens::U16(&t[a..b]),
            Tokens::U32(t) => Tokens::U32(&t[a..b]),
        };
        Example {
            input_ids,
            source_len: self.file.source_lens()[i] as usize,
        }
    }
}
