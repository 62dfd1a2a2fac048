//! Pre-training grouping without Python: a one-id-per-character encoder, corpora with many
//! batches per file, and a naive reference `group_texts` (collect everything, then cut) that the
//! streaming, windowed, parallel builder must equal for every window size. Also the seeded
//! validation split and the manifest counts.

use std::path::{Path, PathBuf};
use zhllama::data::{Encoder, PretrainConfig, PretrainShards, pretrain};

/// Each char → its code point mod 1000 + 10 (so 0..9 stay free for the specials).
struct CharEnc;

impl Encoder for CharEnc {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.chars().map(|c| c as u32 % 1000 + 10).collect()
    }
    fn vocab_size(&self) -> usize {
        1010
    }
    fn bos_id(&self) -> u32 {
        1
    }
    fn eos_id(&self) -> u32 {
        2
    }
    fn unk_id(&self) -> u32 {
        0
    }
    fn pad_id(&self) -> Option<u32> {
        None
    }
}

/// The recipe, written the obvious way: per file, per 1000 lines, concatenate BOS+ids, keep
/// whole blocks (a batch under one block is dropped, as zhllama documents).
fn reference(files: &[Vec<String>], block: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for lines in files {
        for batch in lines.chunks(1000) {
            let cat: Vec<u32> = batch
                .iter()
                .flat_map(|l| std::iter::once(1).chain(CharEnc.encode(l)))
                .collect();
            for b in cat.chunks_exact(block) {
                out.push(b.to_vec());
            }
        }
    }
    out
}

fn corpus(dir: &Path, seed: u64) -> (Vec<PathBuf>, Vec<Vec<String>>) {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let mut paths = Vec::new();
    let mut all = Vec::new();
    for f in 0..3 {
        let n = [2500, 999, 1001][f];
        let lines: Vec<String> = (0..n)
            .map(|_| {
                let len = next() % 40;
                (0..len)
                    .map(|_| char::from_u32(0x4e00 + (next() % 500) as u32).unwrap())
                    .collect()
            })
            .collect();
        let p = dir.join(format!("f{f}.txt"));
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        paths.push(p);
        all.push(lines);
    }
    (paths, all)
}

#[test]
fn windowed_parallel_grouping_equals_the_naive_reference() {
    let d = tempfile::tempdir().unwrap();
    let (paths, lines) = corpus(d.path(), 5);
    let block = 64;
    let want = reference(&lines, block);
    for window in [1, 2, 16] {
        let out = d.path().join(format!("w{window}"));
        let cfg = PretrainConfig {
            block_size: block,
            validation_fraction: 0.0,
            window_batches: window,
            ..Default::default()
        };
        let m = pretrain::build_pretrain(&CharEnc, &paths, &out, &cfg).unwrap();
        let sh = PretrainShards::open(&out).unwrap();
        let got: Vec<Vec<u32>> = (0..sh.train.len())
            .map(|i| sh.train.block(i).to_vec())
            .collect();
        assert!(got == want, "window {window}: blocks differ");
        let tokenized: u64 = lines
            .iter()
            .flatten()
            .map(|l| 1 + l.chars().count() as u64)
            .sum();
        assert_eq!(m.tokenized_tokens, tokenized);
        assert_eq!(m.tokens, (want.len() * block) as u64);
        assert_eq!(
            m.tokenized_tokens,
            m.tokens + m.remainder_tokens_dropped + m.short_batch_tokens
        );
        assert_eq!(m.lines, 4500);
        assert_eq!(m.files.len(), 3);
    }
}

#[test]
fn validation_split_is_seeded_and_sized_like_train_test_split() {
    let d = tempfile::tempdir().unwrap();
    let (paths, lines) = corpus(d.path(), 11);
    let all = reference(&lines, 32);
    let build = |seed: u64, name: &str| {
        let out = d.path().join(name);
        let cfg = PretrainConfig {
            block_size: 32,
            validation_fraction: 0.05,
            seed,
            ..Default::default()
        };
        pretrain::build_pretrain(&CharEnc, &paths, &out, &cfg).unwrap();
        let sh = PretrainShards::open(&out).unwrap();
        let v: Vec<Vec<u32>> = (0..sh.validation.len())
            .map(|i| sh.validation.block(i).to_vec())
            .collect();
        let t: Vec<Vec<u32>> = (0..sh.train.len())
            .map(|i| sh.train.block(i).to_vec())
            .collect();
        (t, v)
    };
    let (t1, v1) = build(1, "a");
    let (t1b, v1b) = build(1, "b");
    let (_, v2) = build(2, "c");
    assert_eq!((&t1, &v1), (&t1b, &v1b), "same seed, different split");
    assert_ne!(v1, v2, "different seeds, same split");
    // HF train_test_split(test_size=f): ceil(f * n) test rows.
    assert_eq!(v1.len(), (0.05 * all.len() as f64).ceil() as usize);
    // Train keeps corpus order: it is `all` with the validation blocks taken out.
    let mut it = all.iter();
    for b in &t1 {
        assert!(
            it.any(|x| x == b),
            "train is not an ordered subsequence of the corpus blocks"
        );
    }
    let mut merged: Vec<Vec<u32>> = t1.iter().chain(&v1).cloned().collect();
    let mut all_sorted = all.clone();
    merged.sort();
    all_sorted.sort();
    assert!(merged == all_sorted);
}

/// `PretrainShards::open` checks each shard against the manifest: a manifest that disagrees on a
/// block count, the block size or the vocabulary is refused, naming the shard and both sides.
#[test]
fn a_manifest_that_disagrees_with_its_shards_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = corpus(d.path(), 5);
    let out = d.path().join("pt");
    let cfg = PretrainConfig {
        block_size: 32,
        validation_fraction: 0.05,
        seed: 3,
        ..Default::default()
    };
    let m = pretrain::build_pretrain(&CharEnc, &paths, &out, &cfg).unwrap();
    PretrainShards::open(&out).unwrap();
    let mpath = out.join("manifest.json");
    let good = std::fs::read_to_string(&mpath).unwrap();
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    for (key, val, file) in [
        ("train_blocks", m.train_blocks + 1, "train.tok"),
        (
            "validation_blocks",
            m.validation_blocks + 2,
            "validation.tok",
        ),
        ("block_size", 33, "train.tok"),
        ("vocab_size", m.vocab_size as u64 + 9, "train.tok"),
    ] {
        let mut bad = v.clone();
        bad[key] = val.into();
        std::fs::write(&mpath, bad.to_string()).unwrap();
        let msg = format!("{:#}", PretrainShards::open(&out).err().expect(key));
        assert!(msg.contains(file), "{key}: {file} not named: {msg}");
        assert!(
            msg.contains("manifest says") && msg.contains(&val.to_string()),
            "{key}: the manifest's {val} not named: {msg}"
        );
    }
    std::fs::write(&mpath, &good).unwrap();
    PretrainShards::open(&out).unwrap();
}

/// A directory input reads its `*.txt` files (sorted) and nothing else — not another extension,
/// not a sub-directory named like a text file — and the output may go under folders that do not
/// exist yet.
#[test]
fn a_directory_input_reads_only_its_text_files_into_a_new_nested_output() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let (_, lines) = corpus(&input, 3);
    std::fs::write(input.join("notes.md"), "not part of the corpus\n").unwrap();
    std::fs::create_dir(input.join("sub.txt")).unwrap();
    let out = d.path().join("a/b/pt");
    let cfg = PretrainConfig {
        block_size: 32,
        validation_fraction: 0.0,
        ..Default::default()
    };
    let files = pretrain::collect_inputs(std::slice::from_ref(&input)).unwrap();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(&input).unwrap())
        .collect();
    assert_eq!(names, ["f0.txt", "f1.txt", "f2.txt"].map(Path::new));
    pretrain::build_pretrain(&CharEnc, &files, &out, &cfg).unwrap();
    let sh = PretrainShards::open(&out).unwrap();
    let got: Vec<Vec<u32>> = (0..sh.train.len())
        .map(|i| sh.train.block(i).to_vec())
        .collect();
    assert_eq!(got, reference(&lines, 32));
}
