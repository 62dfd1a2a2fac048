//! Full-corpus parity with python sentencepiece: every line of every text/JSON file under
//! `../shared/data`, encoded with the LLaMA model, both merged models and the Chinese unigram
//! model (nmt_nfkc), must give exactly the ids `tools/oracle/encode_reference.py` (python
//! sentencepiece) gives — on 100% of lines — and python's ids must decode to the text python
//! decodes them to. Skips with a message when the data or `sentencepiece` is absent
//! (`tools/test.sh` installs it).

mod skip_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use zhllama::vocab::{ModelProto, Tokenizer, merge_models};

fn data_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if d.join("tokenizers/llama_tokenizer.model").is_file() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
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

/// Random strings built to stress the tie rules and normalizers: concatenated vocabulary pieces
/// (ambiguous merges among score-0 pieces), runs of spaces, tabs, CR, rare and astral characters,
/// and characters nmt_nfkc rewrites (full-width forms, ligatures, circled digits). Seeded.
fn random_lines(tok: &Tokenizer, n: usize) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20240601);
    let extras = [
        " ", "  ", "\t", "\r", "𠀀", "😀", "ﬁ", "Ａ", "①", "ｶ", "\u{3000}", "é", "e\u{301}", "—",
        "…",
    ];
    let vocab = tok.vocab_size() as u64;
    (0..n)
        .map(|_| {
            let parts = 1 + rng.next_u64() % 12;
            let mut s = String::new();
            for _ in 0..parts {
                if rng.next_u64() % 4 == 0 {
                    s.push_str(extras[(rng.next_u64() % extras.len() as u64) as usize]);
                } else {
                    let id = 259 + (rng.next_u64() % (vocab - 259)) as u32;
                    s.push_str(&tok.id_to_piece(id).replace('\u{2581}', " "));
                }
            }
            s.replace('\n', " ")
        })
        .collect()
}

#[test]
fn random_strings_parity_with_python_sentencepiece() {
    let Some(data) = data_dir() else { return };
    if !have_sentencepiece() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tk = data.join("tokenizers");
    let mut merged =
        ModelProto::parse(&std::fs::read(tk.join("llama_tokenizer.model")).unwrap()).unwrap();
    let zh = ModelProto::parse(&std::fs::read(tk.join("chinese_sp.model")).unwrap()).unwrap();
    merge_models(&mut merged, &zh, false);
    let merged_path = tmp.path().join("merged.model");
    std::fs::write(&merged_path, merged.to_bytes()).unwrap();
    let lines = random_lines(&Tokenizer::load(&merged_path).unwrap(), 3000);
    let input = tmp.path().join("random.txt");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/oracle/encode_reference.py");
    for model in [
        merged_path.clone(),
        tk.join("llama_tokenizer.model"),
        tk.join("chinese_sp.model"),
    ] {
        let out = tmp.path().join("random.ids");
        let st = Command::new("python3")
            .arg(&script)
            .arg(&model)
            .arg(&out)
            .arg(&input)
            .status()
            .unwrap();
        assert!(st.success());
        let tok = Tokenizer::load(&model).unwrap();
        let want_text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(want_text.lines().count(), lines.len());
        let mut bad = 0;
        for (line, w) in lines.iter().zip(want_text.lines()) {
            let (w, w_text): (Vec<u32>, String) = serde_json::from_str(w).unwrap();
            let g = tok.encode(line);
            if g != w || tok.decode(&w) != w_text {
                if bad < 3 {
                    eprintln!("{model:?}: {line:?}\n  rust   {g:?}\n  python {w:?}");
                }
                bad += 1;
            }
        }
        assert_eq!(
            bad,
            0,
            "{model:?}: {bad} of {} random lines differ",
            lines.len()
        );
    }
}
