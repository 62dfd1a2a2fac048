//! SFT example building and batching without Python, against the recipe text (docs/RECIPE.md §4)
//! written out by hand, with a one-id-per-character encoder. (Exact parity with HF is
//! `data_oracle.rs`.)

use zhllama::data::sft::{PROMPT_TEMPLATE, build_example, build_prompt, build_sft, collate};
use zhllama::data::{Encoder, HfText, SftConfig, SftShards};
use zhllama::instruct::convert::AlpacaRecord;

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

fn ids(s: &str) -> Vec<u32> {
    CharEnc.encode(s)
}

#[test]
fn prompt_labels_truncation_and_padding() {
    let rec = |i: &str, inp: &str, o: &str| AlpacaRecord {
        instruction: i.into(),
        input: inp.into(),
        output: o.into(),
    };
    let head = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";
    assert_eq!(
        PROMPT_TEMPLATE,
        format!("{head}{{instruction}}\n\n### Response: ")
    );
    let r1 = rec("翻译", "hello", "你好");
    assert_eq!(
        build_prompt(&r1),
        format!("{head}翻译\nhello\n\n### Response: ")
    );
    let r2 = rec("写诗", "", "床前明月光");
    assert_eq!(build_prompt(&r2), format!("{head}写诗\n\n### Response: "));

    // No pad piece in the model: `[PAD]` is added with the next id, as the SFT script does.
    let hf = HfText::with_pad(&CharEnc);
    assert_eq!((hf.pad_id(), hf.vocab_size()), (Some(1010), 1011));

    let e = build_example(&hf, &r1, 512);
    let src: Vec<u32> = std::iter::once(1).chain(ids(&build_prompt(&r1))).collect();
    let mut want = src.clone();
    want.extend(ids("你好"));
    want.push(2); // "</s>" text → EOS id
    assert_eq!(e.input_ids, want);
    assert_eq!(e.source_len, src.len());
    let labels = e.labels();
    assert!(labels[..src.len()].iter().all(|&l| l == -100));
    assert_eq!(
        &labels[src.len()..],
        &[ids("你好")[0] as i64, ids("你好")[1] as i64, 2]
    );

    // Right truncation inside the source: every label is -100.
    let short = build_example(&hf, &r1, 10);
    assert_eq!(short.input_ids, src[..10].to_vec());
    assert!(short.truncated && short.labels().iter().all(|&l| l == -100));

    // Batch: right-padded to the longest, labels -100, mask = not pad.
    let e2 = build_example(&hf, &r2, 512);
    let b = collate(&[&e, &e2], 1010);
    let t = b.seq_len;
    assert_eq!(t, e.input_ids.len().max(e2.input_ids.len()));
    for (row, ex) in [&e, &e2].iter().enumerate() {
        let n = ex.input_ids.len();
        assert_eq!(&b.input_ids[row * t..row * t + n], &ex.input_ids[..]);
        assert!(
            b.input_ids[row * t + n..(row + 1) * t]
                .iter()
                .all(|&x| x == 1010)
        );
        assert_eq!(&b.labels[row * t..row * t + n], &ex.labels()[..]);
        assert!(
            b.labels[row * t + n..(row + 1) * t]
                .iter()
                .all(|&x| x == -100)
        );
        let mask = &b.attention_mask[row * t..(row + 1) * t];
        assert!(mask[..n].iter().all(|&m| m) && mask[n..].iter().all(|&m| !m));
    }
}

/// Alpaca records as a JSON file in `dir`; `(path, records)`.
fn alpaca_file(dir: &std::path::Path) -> std::path::PathBuf {
    let recs: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("第{i}题：一加一等于几"),
                "input": "",
                "output": format!("答案是二，第{i}次"),
            })
        })
        .collect();
    let p = dir.join("a.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

/// A set whose prompts fill `max_len` has no target token: refused (it would train at loss 0),
/// naming the length, with nothing written. One token more than the longest prompt is accepted.
#[test]
fn a_set_without_target_tokens_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = alpaca_file(d.path());
    let hf = HfText::with_pad(&CharEnc);
    let recs: Vec<AlpacaRecord> =
        serde_json::from_str::<Vec<AlpacaRecord>>(&std::fs::read_to_string(&src).unwrap()).unwrap();
    let longest = recs
        .iter()
        .map(|r| hf.encode_with_bos(&build_prompt(r)).len())
        .max()
        .unwrap();
    let cfg = |max_len| SftConfig {
        max_len,
        ..SftConfig::default()
    };
    let out = d.path().join("none");
    let e = build_sft(&CharEnc, std::slice::from_ref(&src), &out, &cfg(longest)).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("no target token") && msg.contains(&longest.to_string()),
        "{msg}"
    );
    assert!(!out.exists(), "output written despite the error");
    let out = d.path().join("some");
    let m = build_sft(&CharEnc, &[src], &out, &cfg(longest + 1)).unwrap();
    // Every prompt here has the same length, so each example keeps exactly one target token.
    assert!(
        recs.iter()
            .all(|r| hf.encode_with_bos(&build_prompt(r)).len() == longest)
    );
    assert_eq!((m.examples, m.target_tokens), (5, 5));
}

/// `SftShards::open` checks the examples file against the manifest: a manifest that disagrees on
/// the example count, the token count or the vocabulary is refused, naming the file and both sides.
#[test]
fn a_manifest_that_disagrees_with_its_shard_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = alpaca_file(d.path());
    let out = d.path().join("sft");
    let m = build_sft(
        &CharEnc,
        &[src],
        &out,
        &SftConfig {
            max_len: 200,
            ..SftConfig::default()
        },
    )
    .unwrap();
    SftShards::open(&out).unwrap();
    let mpath = out.join("manifest.json");
    let good = std::fs::read_to_string(&mpath).unwrap();
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    for (key, val) in [
        ("examples", m.examples + 1),
        ("tokens", m.tokens - 1),
        ("vocab_size", m.vocab_size as u64 + 7),
    ] {
        let mut bad = v.clone();
        bad[key] = val.into();
        std::fs::write(&mpath, bad.to_string()).unwrap();
        let msg = format!("{:#}", SftShards::open(&out).err().expect(key));
        assert!(
            msg.contains("train.sft"),
            "{key}: the file not named: {msg}"
        );
        assert!(
            msg.contains(&val.to_string()),
            "{key}: the manifest's {val} not named: {msg}"
        );
    }
    std::fs::write(&mpath, &good).unwrap();
    SftShards::open(&out).unwrap();
}
