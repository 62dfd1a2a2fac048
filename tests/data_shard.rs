//! Token shards: round trips at both widths, and rejection of truncated, oversized, foreign,
//! wrong-version and wrong-kind files with a clear error.

use std::path::Path;
use zhllama::data::shard::{BlockShard, CHECKSUM_CHUNK, ExampleShard, ShardKind, ShardWriter};

/// A deterministic id stream (splitmix-style) so the expected values do not come from the code
/// under test.
fn ids(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as u32
        })
        .collect()
}

fn write_blocks(path: &Path, vocab: usize, block: usize, blocks: &[Vec<u32>]) {
    let mut w = ShardWriter::create(path, ShardKind::Blocks, vocab, block).unwrap();
    for b in blocks {
        w.push_block(b).unwrap();
    }
    w.finish().unwrap();
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn blocks_round_trip_at_u16_and_u32() {
    let dir = tempfile::tempdir().unwrap();
    // 49954 fits u16; 70000 needs u32 (and ids above 65535 must survive).
    for (vocab, width) in [(49954usize, 2u32), (70000, 4)] {
        let p = dir.path().join(format!("b{vocab}.tok"));
        let blocks: Vec<Vec<u32>> = (0..7).map(|s| ids(16, vocab as u32, s)).collect();
        write_blocks(&p, vocab, 16, &blocks);
        let len = std::fs::metadata(&p).unwrap().len();
        // Header + payload + one crc32 for the payload's single 64 KiB chunk.
        assert_eq!(len, 64 + 7 * 16 * width as u64 + 4, "file size");
        let s = BlockShard::open(&p).unwrap();
        assert_eq!((s.len(), s.block_size(), s.vocab_size()), (7, 16, vocab));
        assert_eq!(s.header().token_bytes, width);
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(&s.block(i).to_vec(), b);
            let mut out = vec![0; 16];
            s.read_block(i, &mut out);
            assert_eq!(&out, b);
        }
        if vocab > 65536 {
            assert!(blocks.iter().flatten().any(|&t| t > 65535));
        }
    }
}

#[test]
fn examples_round_trip_with_labels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.sft");
    let lens = [5usize, 1, 12, 0, 9];
    let srcs = [2usize, 1, 12, 0, 3];
    let mut w = ShardWriter::create(&p, ShardKind::Examples, 32001, 512).unwrap();
    let exs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, 32001, i as u64))
        .collect();
    for (e, &s) in exs.iter().zip(&srcs) {
        w.push_example(e, s).unwrap();
    }
    w.finish().unwrap();
    let s = ExampleShard::open(&p).unwrap();
    assert_eq!(s.len(), 5);
    for (i, e) in exs.iter().enumerate() {
        let got = s.example(i);
        assert_eq!(&got.input_ids.to_vec(), e);
        let want: Vec<i64> = e
            .iter()
            .enumerate()
            .map(|(j, &t)| if j < srcs[i] { -100 } else { t as i64 })
            .collect();
        assert_eq!(got.labels(), want);
    }
}

#[test]
fn truncated_oversized_and_foreign_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.tok");
    write_blocks(&good, 32000, 8, &[ids(8, 32000, 1), ids(8, 32000, 2)]);
    let bytes = std::fs::read(&good).unwrap();
    let put = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    let e = err_of(BlockShard::open(&put(
        "trunc.tok",
        &bytes[..bytes.len() - 1],
    )));
    assert!(e.contains("truncated") && e.contains("trunc.tok"), "{e}");
    let e = err_of(BlockShard::open(&put("half.tok", &bytes[..40])));
    assert!(e.contains("shorter than the 64-byte header"), "{e}");
    let mut big = bytes.clone();
    big.extend_from_slice(&[0, 0]);
    let e = err_of(BlockShard::open(&put("big.tok", &big)));
    assert!(e.contains("oversized"), "{e}");
    let e = err_of(BlockShard::open(&put(
        "foreign.tok",
        b"{\"not\": \"a shard\", \"padding\": \"................................................\"}",
    )));
    assert!(e.contains("bad magic"), "{e}");
    let mut v3 = bytes.clone();
    v3[8] = 3;
    let e = err_of(BlockShard::open(&put("v3.tok", &v3)));
    assert!(e.contains("version 3") && e.contains("v3.tok"), "{e}");
    let e = err_of(ExampleShard::open(&good));
    assert!(e.contains("expected Examples"), "{e}");
    let e = err_of(BlockShard::open(&dir.path().join("missing.tok")));
    assert!(e.contains("cannot open"), "{e}");
    // Header counts that disagree with each other.
    let mut bad = bytes.clone();
    bad[40] ^= 1; // tokens no longer = blocks × block size
    let e = err_of(BlockShard::open(&put("counts.tok", &bad)));
    assert!(e.contains("header checksum mismatch"), "{e}");
}

#[test]
fn writer_checks_ids_and_leaves_nothing_when_unfinished() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.tok");
    let mut w = ShardWriter::create(&p, ShardKind::Blocks, 100, 4).unwrap();
    let e = format!("{:#}", w.push_block(&[1, 2, 100, 3]).unwrap_err());
    assert!(e.contains("out of range"), "{e}");
    assert!(w.push_block(&[1, 2, 3]).is_err(), "short block accepted");
    drop(w);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "unfinished writer left files: {left:?}");
}

/// A version-1 header (no checksums), encoded here from the format description rather than by
/// the writer under test.
fn v1_header(kind: u32, vocab: u32, block: u32, records: u64, tokens: u64) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[0..8].copy_from_slice(b"ZHLTOKS\0");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&kind.to_le_bytes());
    h[16..20].copy_from_slice(&(if vocab <= 65536 { 2u32 } else { 4 }).to_le_bytes());
    h[20..24].copy_from_slice(&vocab.to_le_bytes());
    h[24..28].copy_from_slice(&block.to_le_bytes());
    h[32..40].copy_from_slice(&records.to_le_bytes());
    h[40..48].copy_from_slice(&tokens.to_le_bytes());
    h
}

#[test]
fn version_1_files_still_read() {
    let dir = tempfile::tempdir().unwrap();
    // Blocks: 3 blocks of 8 u16 ids.
    let blocks: Vec<Vec<u32>> = (0..3).map(|s| ids(8, 1000, 10 + s)).collect();
    let mut bytes = v1_header(1, 1000, 8, 3, 24);
    for t in blocks.iter().flatten() {
        bytes.extend_from_slice(&(*t as u16).to_le_bytes());
    }
    let p = dir.path().join("old.tok");
    std::fs::write(&p, &bytes).unwrap();
    let s = BlockShard::open(&p).unwrap();
    assert_eq!((s.header().version, s.header().payload_digest), (1, None));
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&s.block(i).to_vec(), b, "block {i}");
    }
    // Examples: 2 examples of 3 and 4 u32 ids (vocab above u16), source lengths 1 and 4.
    let exs = [ids(3, 70000, 1), ids(4, 70000, 2)];
    let mut bytes = v1_header(2, 70000, 16, 2, 7);
    for o in [0u64, 3, 7] {
        bytes.extend_from_slice(&o.to_le_bytes());
    }
    for l in [1u32, 4] {
        bytes.extend_from_slice(&l.to_le_bytes());
    }
    for t in exs.iter().flatten() {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    let p = dir.path().join("old.sft");
    std::fs::write(&p, &bytes).unwrap();
    let s = ExampleShard::open(&p).unwrap();
    assert_eq!(s.header().version, 1);
    for (i, (e, src)) in exs.iter().zip([1usize, 4]).enumerate() {
        let got = s.example(i);
        assert_eq!(
            (&got.input_ids.to_vec(), got.source_len),
            (e, src),
            "example {i}"
        );
    }
}

/// The payload checksum table as the format describes it: one crc32 per 64 KiB payload chunk.
fn table_of(payload: &[u8]) -> Vec<u8> {
    payload
        .chunks(CHECKSUM_CHUNK as usize)
        .flat_map(|c| crc32fast::hash(c).to_le_bytes())
        .collect()
}

#[test]
fn damaged_payload_is_refused_naming_file_and_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // 200 blocks of 512 u16 ids = 1 KiB each: 200 KiB of payload, 4 checksum chunks of 64 blocks.
    let p = dir.path().join("big.tok");
    let blocks: Vec<Vec<u32>> = (0..200).map(|s| ids(512, 32000, s)).collect();
    write_blocks(&p, 32000, 512, &blocks);
    let good = std::fs::read(&p).unwrap();
    let payload_end = 64 + 200 * 1024;
    assert_eq!(
        good.len(),
        payload_end + 4 * 4,
        "header + payload + 4 crc32s"
    );
    assert_eq!(&good[payload_end..], &table_of(&good[64..payload_end])[..]);
    let digest = u32::from_le_bytes(good[48..52].try_into().unwrap());
    assert_eq!(
        digest,
        crc32fast::hash(&good[payload_end..]),
        "header digest"
    );

    // One bit flipped inside block 130 (chunk 2: payload bytes 131072..196608, blocks 128..=191).
    let mut bad = good.clone();
    bad[64 + 130 * 1024 + 10] ^= 0x10;
    let q = dir.path().join("flipped.tok");
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(BlockShard::open(&q));
    assert!(
        e.contains("flipped.tok")
            && e.contains("payload checksum mismatch in bytes 131136..196672")
            && e.contains("blocks 128..=191"),
        "{e}"
    );
    // Unverified opening reads the damaged byte: the checksum is what refuses it.
    let s = BlockShard::open_with(&q, false).unwrap();
    assert_ne!(s.block(130).to_vec(), blocks[130]);

    // The last, short chunk (blocks 192..=199) and the checksum table itself.
    let mut bad = good.clone();
    bad[payload_end - 1] ^= 1;
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(BlockShard::open(&q));
    assert!(e.contains("blocks 192..=199"), "{e}");
    let mut bad = good.clone();
    bad[payload_end + 5] ^= 1;
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(BlockShard::open(&q));
    assert!(
        e.contains("bytes 65600..131136") && e.contains("blocks 64..=127"),
        "{e}"
    );

    // A header field changed (the vocab size) fails the header's own checksum.
    let mut bad = good.clone();
    bad[20] ^= 1;
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(BlockShard::open(&q));
    assert!(
        e.contains("flipped.tok") && e.contains("header checksum mismatch"),
        "{e}"
    );
}

#[test]
fn damaged_examples_are_refused_naming_the_examples() {
    let dir = tempfile::tempdir().unwrap();
    // 100 examples of 400 u16 ids: the offsets (808 B) and lengths (400 B) tables, then 80 000 B
    // of tokens: payload bytes 1208.., example i at payload bytes 1208 + 800·i.
    let p = dir.path().join("e.sft");
    let mut w = ShardWriter::create(&p, ShardKind::Examples, 32001, 512).unwrap();
    for i in 0..100 {
        w.push_example(&ids(400, 32001, i), 10).unwrap();
    }
    w.finish().unwrap();
    let good = std::fs::read(&p).unwrap();
    let payload_end = 64 + 1208 + 80_000;
    assert_eq!(&good[payload_end..], &table_of(&good[64..payload_end])[..]);
    let q = dir.path().join("bad.sft");
    let mut bad = good.clone();
    bad[64 + 100] ^= 1; // inside the offsets table
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(ExampleShard::open(&q));
    assert!(
        e.contains("bad.sft") && e.contains("example offsets and source-length tables"),
        "{e}"
    );
    // Chunk 1 = payload bytes 65536..81208: tokens (65536-1208)/2 = 32164 .. 39999, which are
    // examples 32164/400 = 80 ..= 99.
    let mut bad = good.clone();
    bad[64 + 70_000] ^= 1;
    std::fs::write(&q, &bad).unwrap();
    let e = err_of(ExampleShard::open(&q));
    assert!(
        e.contains("bytes 65600..81272") && e.contains("examples 80..=99"),
        "{e}"
    );
}
