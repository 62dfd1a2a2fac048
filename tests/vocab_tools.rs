//! The vocabulary binaries end to end: `merge-tokenizers` (official hashes, printed counts, HF
//! files, all-or-nothing output), `zhllama tokenize`, and one-line errors on malformed inputs.

mod skip_common;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use zhllama::vocab::Tokenizer;

const LLAMA_49953: &str = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0";
const ALPACA_49954: &str = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8";

fn tokenizers_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tokenizers");
    if d.join("llama_tokenizer.model").is_file() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

fn merge(args: &[&Path], add_pad: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_merge-tokenizers"));
    c.arg("--llama-tokenizer-dir")
        .arg(args[0])
        .arg("--chinese-sp-model-file")
        .arg(args[1])
        .arg("--output-dir")
        .arg(args[2]);
    if add_pad {
        c.arg("--add-pad");
    }
    c.output().unwrap()
}

fn sha(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A failed run: non-zero exit, exactly one line on stderr naming `what`.
fn assert_one_line_error(o: &Output, what: &str) {
    assert!(!o.status.success(), "expected failure for {what}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err:?}");
    assert!(err.contains(what), "error {err:?} does not name {what}");
}

#[test]
fn merge_tool_writes_official_model_and_hf_files() {
    let Some(d) = tokenizers_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The LLaMA side given as a directory holding tokenizer.model, as the original script takes it.
    let llama_dir = tmp.path().join("llama");
    std::fs::create_dir(&llama_dir).unwrap();
    std::fs::copy(
        d.join("llama_tokenizer.model"),
        llama_dir.join("tokenizer.model"),
    )
    .unwrap();
    let zh = d.join("chinese_sp.model");
    for (add_pad, hash, total) in [(false, LLAMA_49953, 49953), (true, ALPACA_49954, 49954)] {
        let out = tmp.path().join(format!("out{total}"));
        let o = merge(&[&llama_dir, &zh, &out], add_pad);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let msg = String::from_utf8_lossy(&o.stdout);
        assert!(msg.contains("appended 17953"), "{msg}");
        assert!(msg.contains("skipped 2047"), "{msg}");
        assert!(msg.contains(&format!("final size {total}")), "{msg}");
        assert_eq!(sha(&out.join("tokenizer.model")), hash);
        let tj: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
        let vocab = tj["model"]["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), total);
        assert_eq!(tj["model"]["byte_fallback"], true);
        assert_eq!(vocab["<0x0A>"], 13);
        // Every merge joins two vocabulary pieces into a third.
        for m in tj["model"]["merges"].as_array().unwrap() {
            let (l, r) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
            assert!(vocab.contains_key(l) && vocab.contains_key(r));
            assert!(vocab.contains_key(&format!("{l}{r}")), "{l}+{r}");
        }
        let stm: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("special_tokens_map.json")).unwrap())
                .unwrap();
        assert_eq!(stm["bos_token"]["content"], "<s>");
        assert_eq!(stm.get("pad_token").is_some(), add_pad);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["tokenizer_class"], "LlamaTokenizer");
        // No temp directories left beside the output.
        let stray: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
    // Re-running over an existing output replaces it whole.
    let out = tmp.path().join("out49953");
    let o = merge(&[&llama_dir, &zh, &out], true);
    assert!(o.status.success());
    assert_eq!(sha(&out.join("tokenizer.model")), ALPACA_49954);
}

#[test]
fn malformed_inputs_fail_with_one_line_and_no_output() {
    let Some(d) = tokenizers_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let zh = d.join("chinese_sp.model");
    let bytes = std::fs::read(d.join("llama_tokenizer.model")).unwrap();
    // Truncated at several points, including inside and between pieces.
    for cut in [1usize, 100, 1000, 250_000, bytes.len() - 3] {
        let p = tmp.path().join(format!("cut{cut}.model"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let out = tmp.path().join("out");
        let o = merge(&[&p, &zh, &out], false);
        assert_one_line_error(&o, &format!("cut{cut}.model"));
        assert!(!out.exists(), "output written for a truncated model");
    }
    // Not a SentencePiece file at all.
    let p = tmp.path().join("notes.txt");
    std::fs::write(&p, "this is not a model\n").unwrap();
    let out = tmp.path().join("out");
    assert_one_line_error(
        &merge(&[&d.join("llama_tokenizer.model"), &p, &out], false),
        "notes.txt",
    );
    assert!(!out.exists());
    // A directory without tokenizer.model.
    let empty = tmp.path().join("emptydir");
    std::fs::create_dir(&empty).unwrap();
    assert_one_line_error(&merge(&[&empty, &zh, &out], false), "tokenizer.model");
    assert!(!out.exists());
    // The same errors from `zhllama tokenize`.
    let input = tmp.path().join("in.txt");
    std::fs::write(&input, "你好\n").unwrap();
    for bad in [&p, &empty] {
        let o = Command::new(env!("CARGO_BIN_EXE_zhllama"))
            .arg("tokenize")
            .arg("--tokenizer")
            .arg(bad)
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        assert_one_line_error(&o, bad.file_name().unwrap().to_str().unwrap());
    }
}

#[test]
fn tokenize_cli_writes_one_json_array_per_line() {
    let Some(d) = tokenizers_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let lines = [
        "白日依山尽，黄河入海流。",
        "",
        " Hello  world ",
        "emoji 😀 and 𠀀",
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model = d.join("llama_tokenizer.model");
    let out = tmp.path().join("ids.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["tokenize", "--tokenizer"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tok = Tokenizer::load(&model).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let got: Vec<Vec<u32>> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<Vec<u32>> = lines.iter().map(|l| tok.encode(l)).collect();
    assert_eq!(got, want);
    // stdout by default, same bytes.
    let o = Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["tokenize", "--tokenizer"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(o.stdout).unwrap(), text);
}
