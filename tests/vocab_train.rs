//! `train-vocab` output checked by python sentencepiece (the reference that must load it): it
//! loads, has the requested size, and encode→decode reproduces the training corpus — every line
//! with byte fallback, every line made only of covered characters without. Our own encoder must
//! give python's ids on it too. Skips when the data or `sentencepiece` is absent.

mod skip_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use zhllama::vocab::Tokenizer;

fn corpus() -> Option<PathBuf> {
    let f = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/zh_corpus/cmrc2019_stories_filled.txt");
    if f.is_file() {
        Some(f)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", f.display()));
        None
    }
}

fn have_sentencepiece() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import sentencepiece"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skip_common::skip("python3 with sentencepiece not available (tools/test.sh installs it)");
    }
    ok
}

fn train(corpus: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train-vocab"))
        .arg(corpus)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Python checks; prints "size lines roundtrip_ok covered_lines covered_ok" and writes ids.
const CHECK: &str = r#"
import json, sys
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
lines = [l for l in open(sys.argv[2], encoding="utf-8").read().split("\n") if l]
pieces = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
ok = cov = cov_ok = 0
ids = []
for l in lines:
    e = sp.encode(l)
    ids.append(e)
    same = sp.decode(e) == l
    ok += same
    if all(c in pieces for c in l.replace(" ", "\u2581")):
        cov += 1
        cov_ok += same
json.dump(ids, open(sys.argv[3], "w"))
print(sp.vocab_size(), len(lines), ok, cov, cov_ok)
"#;

fn python_check(model: &Path, corpus: &Path, ids: &Path) -> Vec<usize> {
    let o = Command::new("python3")
        .args(["-c", CHECK])
        .arg(model)
        .arg(corpus)
        .arg(ids)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

#[test]
fn trained_vocab_loads_in_sentencepiece_and_round_trips() {
    let Some(corpus) = corpus() else { return };
    if !have_sentencepiece() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&corpus).unwrap();
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    for (size, extra) in [
        (
            3000usize,
            vec!["--byte-fallback", "--character-coverage", "0.98"],
        ),
        (4000, vec!["--character-coverage", "0.995"]),
        (
            3500,
            vec![
                "--model-type",
                "unigram",
                "--character-coverage",
                "0.99",
                "--byte-fallback",
            ],
        ),
        (
            4000,
            vec!["--model-type", "unigram", "--character-coverage", "0.995"],
        ),
    ] {
        let model = tmp.path().join(format!("v{size}.model"));
        let mut args = vec!["--vocab-size".to_string(), size.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = train(&corpus, &model, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ids_file = tmp.path().join("ids.json");
        let r = python_check(&model, &corpus, &ids_file);
        let (got_size, n, ok, covered, covered_ok) = (r[0], r[1], r[2], r[3], r[4]);
        assert_eq!(got_size, size);
        assert_eq!(n, lines.len());
        if extra.contains(&"--byte-fallback") {
            assert_eq!(ok, n, "byte fallback must round-trip every line");
        }
        assert!(covered > 0, "no fully covered line to check");
        assert_eq!(covered_ok, covered, "covered lines must round-trip");
        // Our encoder agrees with python on the trained model.
        let want: Vec<Vec<u32>> =
            serde_json::from_slice(&std::fs::read(&ids_file).unwrap()).unwrap();
        let tok = Tokenizer::load(&model).unwrap();
        assert_eq!(tok.vocab_size(), size);
        assert_eq!(tok.encode_batch(&lines), want);
    }
}

#[test]
fn impossible_requests_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, "ab ab ab\nabc\n").unwrap();
    let out = tmp.path().join("m.model");
    // Too small for the specials + characters.
    let o = train(&corpus, &out, &["--vocab-size", "5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("smaller than"));
    // Larger than the corpus supports.
    let o = train(&corpus, &out, &["--vocab-size", "500"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at most"));
    assert!(!out.exists());
    // A tiny exact one works and is what the trainer says.
    let o = train(&corpus, &out, &["--vocab-size", "9"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tok = Tokenizer::load(&out).unwrap();
    assert_eq!(tok.vocab_size(), 9);
    assert_eq!(tok.decode(&tok.encode("ab abc")), "ab abc");
}
