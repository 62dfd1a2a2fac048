//! The hostile-input harness: a fixture directory with every kind of input and an earlier output,
//! and one data-driven [`check`] that runs a built binary on a bad input and asserts the promises
//! of docs/RELIABILITY.md: a non-zero exit (not a panic, not a signal), exactly one `error:` line
//! naming the file, flag or tensor, and the fixture byte-identical afterwards (no input or earlier
//! output changed, nothing left behind: not even a temp file).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../train_common/mod.rs"]
mod train_common;

/// One hostile case: `args` is split on whitespace, `{name}` is replaced by the fixture path
/// `name` (see [`Fixture::path`]); every `needles` entry (placeholders expanded the same way) must
/// appear in the error line.
pub struct Case {
    pub name: &'static str,
    pub bin: &'static str,
    pub args: &'static str,
    pub needles: &'static [&'static str],
}

pub const fn case(
    name: &'static str,
    bin: &'static str,
    args: &'static str,
    needles: &'static [&'static str],
) -> Case {
    Case {
        name,
        bin,
        args,
        needles,
    }
}

pub struct Fixture {
    pub tmp: tempfile::TempDir,
}

fn bin_path(bin: &str) -> &'static str {
    match bin {
        "zhllama" => env!("CARGO_BIN_EXE_zhllama"),
        "merge-tokenizers" => env!("CARGO_BIN_EXE_merge-tokenizers"),
        "train-vocab" => env!("CARGO_BIN_EXE_train-vocab"),
        "prep-data" => env!("CARGO_BIN_EXE_prep-data"),
        "crawl-prompts" => env!("CARGO_BIN_EXE_crawl-prompts"),
        other => panic!("unknown binary {other}"),
    }
}

/// Run `bin args` and require success (fixture building).
fn must(bin: &str, args: &[&str]) {
    let o = Command::new(bin_path(bin)).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "fixture step {bin} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The model vocabulary: the test tokenizer's 59 pieces + the SFT `[PAD]`.
pub const VOCAB: usize = 60;

impl Fixture {
    /// Everything the cases read, under one temp dir (`tok/`, `model/`, `pt/`, `sft/`, `run/`, …).
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        // Two small corpora and their tokenizers (train-vocab, the real tool).
        std::fs::create_dir_all(r.join("corpus")).unwrap();
        let words = [
            "the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "and", "then", "came",
            "back", "home",
        ];
        let mut en = String::new();
        let mut state = 7u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        for _ in 0..200 {
            let line: Vec<&str> = (0..8).map(|_| words[next(words.len())]).collect();
            en.push_str(&line.join(" "));
            en.push('\n');
        }
        let zh_chars: Vec<char> = "我们你他她它是的了在有和人这中大为上个国不以会到说时要就出也"
            .chars()
            .collect();
        let mut zh = String::new();
        for _ in 0..200 {
            zh.extend((0..10).map(|_| zh_chars[next(zh_chars.len())]));
            zh.push('\n');
        }
        std::fs::write(r.join("corpus/en.txt"), &en).unwrap();
        std::fs::write(r.join("corpus/zh.txt"), &zh).unwrap();
        std::fs::create_dir_all(r.join("tok")).unwrap();
        let (en_txt, zh_txt) = (s(&r.join("corpus/en.txt")), s(&r.join("corpus/zh.txt")));
        let (en_model, zh_model) = (s(&r.join("tok/en.model")), s(&r.join("tok/zh.model")));
        must(
            "train-vocab",
            &[&en_txt, "--vocab-size", "59", "--output", &en_model],
        );
        must(
            "train-vocab",
            &[&zh_txt, "--vocab-size", "60", "--output", &zh_model],
        );
        must(
            "merge-tokenizers",
            &[
                "--llama-tokenizer-dir",
                &en_model,
                "--chinese-sp-model-file",
                &zh_model,
                "--output-dir",
                &s(&r.join("merged")),
            ],
        );
        // Alpaca records and token shards (the real `data` commands).
        let recs: Vec<serde_json::Value> = (0..12)
            .map(|i| {
                serde_json::json!({
                    "instruction": format!("the cat sat {}", words[i % words.len()]),
                    "input": "",
                    "output": format!("then the dog ran {} and came back home", words[(i * 5) % words.len()]),
                })
            })
            .collect();
        std::fs::write(r.join("alpaca.json"), serde_json::to_string(&recs).unwrap()).unwrap();
        must(
            "zhllama",
            &[
                "data",
                "pretrain",
                "--tokenizer",
                &en_model,
                "--input",
                &s(&r.join("corpus/en.txt")),
                "--output",
                &s(&r.join("pt")),
                "--block-size",
                "16",
                "--validation-fraction",
                "0.1",
                "--quiet",
            ],
        );
        must(
            "zhllama",
            &[
                "data",
                "sft",
                "--tokenizer",
                &en_model,
                "--input",
                &s(&r.join("alpaca.json")),
                "--output",
                &s(&r.join("sft")),
                "--max-len",
                "256",
                "--quiet",
            ],
        );
        // Models: a good one, one with a NaN weight, one whose config.json claims huge sizes.
        train_common::tiny_model(&r.join("model"), VOCAB, 3);
        // Same shapes, other values: a different base model a resume must notice.
        train_common::tiny_model(&r.join("model2"), VOCAB, 4);
        copy_dir(&r.join("model"), &r.join("nan_model"));
        poke_nan(&r.join("nan_model"), "model.norm.weight");
        copy_dir(&r.join("model"), &r.join("huge_model"));
        let cpath = r.join("huge_model/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cpath).unwrap()).unwrap();
        cfg["hidden_size"] = serde_json::json!(1u64 << 20);
        cfg["intermediate_size"] = serde_json::json!(1u64 << 22);
        cfg["num_attention_heads"] = serde_json::json!(1u64 << 13);
        cfg["num_key_value_heads"] = serde_json::json!(1u64 << 13);
        cfg["vocab_size"] = serde_json::json!(1u64 << 24);
        std::fs::write(&cpath, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        // An earlier run: one SFT step, so run/ holds metrics, a checkpoint and an adapter.
        must(
            "zhllama",
            &[
                "train",
                "--stage",
                "sft",
                "--model",
                &s(&r.join("model")),
                "--data",
                &s(&r.join("sft")),
                "--output",
                &s(&r.join("run")),
                "--max-steps",
                "1",
                "--save-steps",
                "1",
                "--batch-size",
                "2",
                "--micro-batch-size",
                "2",
                "--lora-rank",
                "2",
            ],
        );
        // Finite weights whose activations overflow (every f32 weight ×1e12: attention scores
        // pass f32's 3.4e38), for eval's loss and generate's logits.
        copy_dir(&r.join("model"), &r.join("hot_model"));
        map_f32(&r.join("hot_model/model.safetensors"), |_, x| x * 1e12);
        // An adapter with finite but huge factors: B·A overflows f32 when merged.
        copy_dir(&r.join("run/adapter"), &r.join("overflow_adapter"));
        map_f32(
            &r.join("overflow_adapter/adapter_model.safetensors"),
            |n, x| if n.contains(".lora_") { 1e30 } else { x },
        );
        // An adapter whose adapter_config.json disagrees with its tensors (r = 3 over rank-2).
        copy_dir(&r.join("run/adapter"), &r.join("r3_adapter"));
        let apath = r.join("r3_adapter/adapter_config.json");
        let mut a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&apath).unwrap()).unwrap();
        a["r"] = serde_json::json!(3);
        std::fs::write(&apath, serde_json::to_vec_pretty(&a).unwrap()).unwrap();
        // Pre-training data with one payload bit flipped in train.tok (block 3), and data whose
        // train.tok is another valid shard than the one its manifest describes.
        copy_dir(&r.join("pt"), &r.join("pt_damaged"));
        let tpath = r.join("pt_damaged/train.tok");
        let mut t = std::fs::read(&tpath).unwrap();
        t[64 + 3 * 16 * 2 + 1] ^= 0x04;
        std::fs::write(&tpath, t).unwrap();
        copy_dir(&r.join("pt"), &r.join("pt_swapped"));
        std::fs::copy(r.join("pt/validation.tok"), r.join("pt_swapped/train.tok")).unwrap();
        // A model directory whose safetensors file is garbage.
        copy_dir(&r.join("model"), &r.join("garbage_model"));
        std::fs::write(
            r.join("garbage_model/model.safetensors"),
            [0x13u8, 0x37, 0, 0].repeat(9),
        )
        .unwrap();
        // The same records cut at another length: other data of the same kind.
        must(
            "zhllama",
            &[
                "data",
                "sft",
                "--tokenizer",
                &en_model,
                "--input",
                &s(&r.join("alpaca.json")),
                "--output",
                &s(&r.join("sft2")),
                "--max-len",
                "200",
                "--quiet",
            ],
        );
        // SFT data whose manifest says no target token (as an older `data sft` could write).
        copy_dir(&r.join("sft"), &r.join("sft_untargeted"));
        let mpath = r.join("sft_untargeted/manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["target_tokens"] = serde_json::json!(0);
        std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        // Odds and ends.
        std::fs::create_dir_all(r.join("foreign")).unwrap();
        std::fs::write(r.join("foreign/notes.txt"), "someone's files\n").unwrap();
        std::fs::write(r.join("file.txt"), "a regular file\n").unwrap();
        std::fs::write(
            r.join("garbage.bin"),
            [0xffu8, 0x00, 0x13, 0x37, 0x42].repeat(7),
        )
        .unwrap();
        std::fs::write(r.join("bad.json"), "[[1, 2, 3], [4, 5,").unwrap();
        std::fs::write(r.join("tokens.json"), "[[1, 5, 9, 12], [1, 7, 7]]").unwrap();
        std::fs::write(r.join("tokens_oov.json"), "[[1, 5, 100000]]").unwrap();
        std::fs::write(r.join("tokens_empty.json"), "[]").unwrap();
        std::fs::write(r.join("empty.txt"), "").unwrap();
        std::fs::write(r.join("prompts.txt"), "the cat\n").unwrap();
        std::fs::write(r.join("bad.toml"), "learning_rate = [\n").unwrap();
        std::fs::write(
            r.join("missing_output.json"),
            r#"[{"instruction": "the cat", "input": ""}]"#,
        )
        .unwrap();
        std::fs::create_dir_all(r.join("empty_dir")).unwrap();
        std::fs::write(r.join("topics.txt"), "cats\ndogs\n").unwrap();
        Fixture { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// `{name}` → `<root>/<name>` with `_SLASH_`-free names; `{root}` → the root itself.
    pub fn path(&self, name: &str) -> PathBuf {
        if name == "root" {
            self.root().to_path_buf()
        } else {
            self.root().join(name.replace("__", "/"))
        }
    }

    pub fn expand(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let j = rest[i..].find('}').expect("unclosed placeholder") + i;
            out.push_str(self.path(&rest[i + 1..j]).to_str().unwrap());
            rest = &rest[j + 1..];
        }
        out.push_str(rest);
        out
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Replace every element `x` of every f32 tensor `name` in the safetensors file `path` by
/// `f(name, x)`, in place.
fn map_f32(path: &Path, f: impl Fn(&str, f32) -> f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name} is not f32");
        let a = t["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
        let b = t["data_offsets"][1].as_u64().unwrap() as usize + 8 + n;
        for c in bytes[a..b].chunks_exact_mut(4) {
            let x = f32::from_le_bytes(c.try_into().unwrap());
            c.copy_from_slice(&f(name, x).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// Set the first element of f32 tensor `name` in `dir/model.safetensors` to NaN.
fn poke_nan(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32", "{name} is not f32");
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

/// Every file and directory under `root` (hidden ones included) with its bytes.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                walk(&p, root, out);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Run one case and assert every promise (see the module header).
pub fn check(fx: &Fixture, c: &Case) {
    check_env(fx, c, &[]);
}

/// [`check`] with extra environment variables for the binary.
pub fn check_env(fx: &Fixture, c: &Case, env: &[(&str, &str)]) {
    let before = snapshot(fx.root());
    let args: Vec<String> = c.args.split_whitespace().map(|a| fx.expand(a)).collect();
    let o = Command::new(bin_path(c.bin))
        .args(&args)
        .envs(env.iter().copied())
        .env_remove("OPENAI_API_KEY")
        .env("RUST_BACKTRACE", "0")
        .current_dir(fx.root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let code = o.status.code();
    assert!(
        code.is_some(),
        "[{}] killed by a signal (abort?): {stderr}",
        c.name
    );
    assert_ne!(
        code,
        Some(0),
        "[{}] exit 0 on a bad input: {stderr}",
        c.name
    );
    assert_ne!(code, Some(101), "[{}] panicked: {stderr}", c.name);
    assert!(!stderr.contains("panicked"), "[{}] panic: {stderr}", c.name);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "[{}] expected exactly one error line, got: {stderr}",
        c.name
    );
    assert_eq!(
        stderr.lines().rfind(|l| !l.trim().is_empty()),
        Some(errors[0]),
        "[{}] the error is not the last line: {stderr}",
        c.name
    );
    for n in c.needles {
        let n = fx.expand(n);
        assert!(
            errors[0].contains(&n),
            "[{}] `{n}` missing from: {}",
            c.name,
            errors[0]
        );
    }
    let after = snapshot(fx.root());
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "[{}] files created, changed or removed: {changed:?} ({})",
        c.name,
        errors[0]
    );
}

/// Run every case of a table, then report how many ran.
pub fn check_all(fx: &Fixture, cases: &[Case]) {
    for c in cases {
        check(fx, c);
    }
    eprintln!("{} hostile cases passed", cases.len());
}
