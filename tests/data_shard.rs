//! Token shards: round trips at both widths, and rejection of truncated, oversized, foreign,
//! wrong-version and wrong-kind files with a clear error.

use std::path::Path;
use zhllama::data::shard::{BlockShard, ExampleShard, ShardKind, ShardWriter};

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
        assert_eq!(len, 64 + 7 * 16 * width as u64, "file size");
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
    let mut v2 = bytes.clone();
    v2[8] = 2;
    let e = err_of(BlockShard::open(&put("v2.tok", &v2)));
    assert!(e.contains("version 2"), "{e}");
    let e = err_of(ExampleShard::open(&good));
    assert!(e.contains("expected Examples"), "{e}");
    let e = err_of(BlockShard::open(&dir.path().join("missing.tok")));
    assert!(e.contains("cannot open"), "{e}");
    // Header counts that disagree with each other.
    let mut bad = bytes.clone();
    bad[40] ^= 1; // tokens no longer = blocks × block size
    let e = err_of(BlockShard::open(&put("counts.tok", &bad)));
    assert!(e.contains("header implies") || e.contains("corrupt"), "{e}");
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
