//! Malformed input through the real binaries: a one-line error naming the file and line (exit 1,
//! no panic, no output left behind), or with `--skip-bad` a complete output that counts what was
//! skipped.

mod skip_common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn shared() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if d.is_dir() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

struct Run {
    ok: bool,
    stderr: String,
}

fn run(bin: &str, args: &[&str]) -> Run {
    let o = Command::new(bin).args(args).output().unwrap();
    Run {
        ok: o.status.success(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn zhllama(args: &[&str]) -> Run {
    run(env!("CARGO_BIN_EXE_zhllama"), args)
}

fn prep(args: &[&str]) -> Run {
    run(env!("CARGO_BIN_EXE_prep-data"), args)
}

/// Failed with exactly one `error:` line containing every `needles`, no panic, nothing written.
fn assert_one_line_error(r: &Run, needles: &[&str], out: &Path) {
    assert!(!r.ok, "expected failure, stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {:?}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
    assert!(!out.exists(), "{} exists after a failure", out.display());
    let parent = out.parent().unwrap();
    let junk: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(junk.is_empty(), "temporary files left: {junk:?}");
}

fn to_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|x| x.as_str()).collect()
}

/// Hex sha256 of `path` by coreutils' `sha256sum` (a reference independent of the `sha2` crate).
fn sha256sum(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success(), "sha256sum {}", path.display());
    String::from_utf8(o.stdout).unwrap()[..64].to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pretrain_bad_input() {
    let Some(data) = shared() else { return };
    let tok = data.join("tokenizers/llama_tokenizer.model");
    let d = tempfile::tempdir().unwrap();
    let inp = d.path().join("in");
    std::fs::create_dir(&inp).unwrap();
    let text = "第一行\n".repeat(300);
    // A lone `\r` ends a line too (as in `str.splitlines`): lines 301–303, so the bad line's
    // number counts them.
    let mut bytes = format!("{text}x\ry\rz\r\nok\n").into_bytes();
    bytes.extend_from_slice(b"bad \xff byte\n\xfe\n");
    std::fs::write(inp.join("a.txt"), &bytes).unwrap();
    let out = d.path().join("outdir").join("pt");
    std::fs::create_dir(d.path().join("outdir")).unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            "data",
            "pretrain",
            "--tokenizer",
            s(&tok),
            "--input",
            s(&inp),
        ];
        v.extend(["--output", s(&out), "--block-size", "16", "--quiet"]);
        v.extend(extra);
        v.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };

    // Non-UTF-8 line 305 (300 good lines, three split at `\r`, "ok", then the bad one).
    let a = args(&[]);
    let r = zhllama(&to_refs(&a));
    assert_one_line_error(&r, &["a.txt:305", "UTF-8"], &out);

    // Skipped and counted with --skip-bad; the output is complete.
    let a = args(&["--skip-bad", "--validation-fraction", "0"]);
    let r = zhllama(&to_refs(&a));
    assert!(r.ok, "{}", r.stderr);
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["bad_lines_skipped"], 2);
    assert_eq!(m["lines"], 304);
    // Per-file statistics name their file.
    let f0 = &m["files"][0];
    assert_eq!(f0["path"], s(&inp.join("a.txt")), "{f0}");
    assert_eq!((&f0["lines"], &f0["bad_lines"]), (&304.into(), &2.into()));
    // LLaMA's 32000 ids fit in u16.
    assert_eq!(m["token_dtype"], "u16");
    assert_eq!(
        m["tokenizer_sha256"],
        sha256sum(&tok),
        "the tokenizer the ids came from"
    );
    std::fs::remove_dir_all(&out).unwrap();

    // An existing output is never overwritten.
    std::fs::create_dir(&out).unwrap();
    let a = args(&["--skip-bad"]);
    let r = zhllama(&to_refs(&a));
    assert!(!r.ok && r.stderr.contains("already exists"), "{}", r.stderr);
    std::fs::remove_dir_all(&out).unwrap();

    // Empty file.
    std::fs::write(inp.join("b.txt"), b"").unwrap();
    std::fs::write(inp.join("a.txt"), text.as_bytes()).unwrap();
    let a = args(&[]);
    assert_one_line_error(&zhllama(&to_refs(&a)), &["b.txt", "empty file"], &out);
    let a = args(&["--skip-bad", "--validation-fraction", "0"]);
    let r = zhllama(&to_refs(&a));
    assert!(r.ok, "{}", r.stderr);
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["empty_files_skipped"], 1);
    std::fs::remove_dir_all(&out).unwrap();

    // Wrong tokenizer: a JSON file, a truncated model, a directory without tokenizer.model.
    let bad_tok = data.join("pclue/pCLUE_train_9.json");
    let mut a = args(&[]);
    a[3] = s(&bad_tok).to_string();
    assert_one_line_error(&zhllama(&to_refs(&a)), &["pCLUE_train_9.json"], &out);
    let cut = d.path().join("cut.model");
    let model = std::fs::read(data.join("tokenizers/llama_tokenizer.model")).unwrap();
    std::fs::write(&cut, &model[..model.len() / 2]).unwrap();
    a[3] = s(&cut).to_string();
    assert_one_line_error(&zhllama(&to_refs(&a)), &["cut.model"], &out);
    a[3] = s(&inp).to_string();
    assert_one_line_error(&zhllama(&to_refs(&a)), &["tokenizer.model"], &out);

    // A corpus too small for one block is an error, not an empty output.
    std::fs::remove_file(inp.join("b.txt")).unwrap();
    let mut a = args(&[]);
    a[9] = "100000".into();
    assert_one_line_error(
        &zhllama(&to_refs(&a)),
        &["no complete 100000-token block"],
        &out,
    );
}

#[test]
fn sft_bad_input() {
    let Some(data) = shared() else { return };
    let tok = data.join("tokenizers/llama_tokenizer.model");
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"instruction": "说你好", "input": "", "output": "你好"}"#;
    let cases: &[(&str, &[u8], &str)] = &[
        ("badjson.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": oops}\n", ":2: bad JSON"),
        ("missing.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\"}\n", ":3: missing field `output`"),
        ("notutf8.jsonl", b"{\"instruction\": \"a\", \"output\": \"\xff\"}\n", ":1: not valid UTF-8"),
        ("empty.json", b"  \n", "empty file"),
        ("array.json", b"[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": 3, \"output\": \"b\"}\n]\n", ":3: record 1: field `instruction` is not a string"),
    ];
    for (name, bytes, needle) in cases {
        let f = d.path().join(name);
        let mut content = bytes.to_vec();
        if !name.starts_with("empty") && !name.starts_with("array") {
            content.extend_from_slice(format!("{good}\n").as_bytes());
        }
        std::fs::write(&f, &content).unwrap();
        let out = d.path().join(format!("out-{name}"));
        let r = zhllama(&[
            "data",
            "sft",
            "--tokenizer",
            s(&tok),
            "--input",
            s(&f),
            "--output",
            s(&out),
            "--quiet",
        ]);
        assert_one_line_error(&r, &[name, needle], &out);
        let r = zhllama(&[
            "data",
            "sft",
            "--tokenizer",
            s(&tok),
            "--input",
            s(&f),
            "--output",
            s(&out),
            "--quiet",
            "--skip-bad",
        ]);
        if name.starts_with("empty") {
            assert!(!r.ok && r.stderr.contains("no examples"), "{}", r.stderr);
            continue;
        }
        assert!(r.ok, "{name}: {}", r.stderr);
        let m: Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        let skipped: u64 = m["files"][0]["skipped"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(skipped, 1, "{name}: {m}");
        assert_eq!(m["tokenizer_sha256"], sha256sum(&tok), "{name}");
    }
}

#[test]
fn prep_data_bad_input() {
    let Some(data) = shared() else { return };
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("mix.json");
    let b = data.join("translation2019zh/translation2019zh_valid_sample_b.json");
    // The shared sample b has trailing text after the JSON object on line 28.
    let r = prep(&["--translation2019zh", s(&b), "--output", s(&out)]);
    assert_one_line_error(
        &r,
        &["translation2019zh_valid_sample_b.json:28", "bad JSON"],
        &out,
    );
    let r = prep(&[
        "--translation2019zh",
        s(&b),
        "--output",
        s(&out),
        "--skip-bad",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let st: Value =
        serde_json::from_slice(&std::fs::read(d.path().join("mix.stats.json")).unwrap()).unwrap();
    let t = &st["sources"]["translation2019zh"];
    assert_eq!(t["dropped"]["bad_json"], 1, "{t}");
    // 671 lines, one malformed: 670 pairs parsed, every one kept or dropped by a named rule.
    assert_eq!(t["read"], 670);
    let dropped_by_rules: u64 = t["dropped"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "bad_json")
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(t["kept"].as_u64().unwrap() + dropped_by_rules, 670);
    let recs: Vec<Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(recs.len() as u64, t["kept"].as_u64().unwrap());

    // Missing field in pCLUE, an empty file.
    let p = d.path().join("p.json");
    std::fs::write(
        &p,
        "{\"input\": \"问题\", \"target\": \"答案\"}\n{\"input\": \"只有输入\"}\n",
    )
    .unwrap();
    let out2 = d.path().join("m2.json");
    let r = prep(&["--pclue", s(&p), "--output", s(&out2)]);
    assert_one_line_error(&r, &["p.json:2", "missing field `target`"], &out2);
    let e = d.path().join("e.json");
    std::fs::write(&e, "").unwrap();
    let r = prep(&["--alpaca", s(&e), "--output", s(&out2)]);
    assert_one_line_error(&r, &["e.json", "empty file"], &out2);
}
