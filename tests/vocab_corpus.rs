//! Full-corpus parity with python sentencepiece: every line of every text/JSON file under
//! `../shared/data`, encoded with the LLaMA model, both merged models and the Chinese unigram
//! model (nmt_nfkc), must give exactly the ids `tools/oracle/encode_reference.py` (python
//! sentencepiece) gives — on 100% of lines — and python's ids must decode to the text python
//! decodes them to. Skips with a message when the data or `sentencepiece` is absent
//! (`tools/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use zhllama::vocab::{ModelProto, Tokenizer, merge_models};

fn data_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if d.join("tokenizers/llama_tokenizer.model").is_file() {
        Some(d)
    } else {
        eprintln!("SKIP: {} not found (shared data absent)", d.display());
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
        eprintln!("SKIP: python3 with sentencepiece not available (tools/test.sh installs it)");
    }
    ok
}

fn corpus_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            corpus_files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt" | "json" | "jsonl" | "md")
        ) {
            out.push(p);
        }
    }
}

#[test]
fn corpus_parity_with_python_sentencepiece() {
    let Some(data) = data_dir() else { return };
    if !have_sentencepiece() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tk = data.join("tokenizers");
    let llama_bytes = std::fs::read(tk.join("llama_tokenizer.model")).unwrap();
    let zh = ModelProto::parse(&std::fs::read(tk.join("chinese_sp.model")).unwrap()).unwrap();
    let mut models = vec![
        ("llama", tk.join("llama_tokenizer.model")),
        ("chinese_sp", tk.join("chinese_sp.model")),
    ];
    for (name, pad) in [("merged49953", false), ("merged49954", true)] {
        let mut m = ModelProto::parse(&llama_bytes).unwrap();
        merge_models(&mut m, &zh, pad);
        let p = tmp.path().join(format!("{name}.model"));
        std::fs::write(&p, m.to_bytes()).unwrap();
        models.push((name, p));
    }
    let mut files = Vec::new();
    corpus_files(&data, &mut files);
    assert!(
        files.len() >= 8,
        "expected the shared corpus files, found {files:?}"
    );
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let lines: Vec<&str> = texts.iter().flat_map(|t| t.split('\n')).collect();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oracle/encode_reference.py");
    for (name, model) in &models {
        let out = tmp.path().join(format!("{name}.ids"));
        let st = Command::new("python3")
            .arg(&script)
            .arg(model)
            .arg(&out)
            .args(&files)
            .status()
            .unwrap();
        assert!(st.success(), "{script:?} failed for {name}");
        let want_text = std::fs::read_to_string(&out).unwrap();
        let want: Vec<&str> = want_text.lines().collect();
        assert_eq!(want.len(), lines.len(), "{name}: line count");

        let tok = Tokenizer::load(model).unwrap();
        let got = tok.encode_batch(&lines);
        let mut bad = 0;
        let mut tokens = 0usize;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            tokens += g.len();
            let (w, w_text): (Vec<u32>, String) = serde_json::from_str(w).unwrap();
            if *g != w {
                if bad < 3 {
                    eprintln!(
                        "{name}: line {i} {:?}\n  rust   {g:?}\n  python {w:?}",
                        lines[i]
                    );
                }
                bad += 1;
            }
            assert_eq!(tok.decode(&w), w_text, "{name}: decode of line {i}");
        }
        eprintln!(
            "{name}: {} lines, {tokens} tokens, {bad} differ",
            lines.len()
        );
        assert_eq!(
            bad,
            0,
            "{name}: {bad} of {} lines differ from python",
            lines.len()
        );
    }
}
