//! The instruction-data converters, filters and mixer (`prep-data`'s library side).

mod skip_common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use zhllama::instruct::convert::{
    self, AlpacaRecord, EN_TO_ZH_TEMPLATES, SkipCounts, TranslationPair, ZH_TO_EN_TEMPLATES,
};
use zhllama::instruct::filter::{Dedup, FilterConfig, check_pair, check_record, normalize};
use zhllama::instruct::mix::{MixConfig, RecipeFile, SourceKind, SourceSpec, mix};

fn shared() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if d.is_dir() {
        Some(d)
    } else {
        skip_common::skip(&format!("../shared data absent: {} not found", d.display()));
        None
    }
}

fn rec(i: &str, inp: &str, o: &str) -> AlpacaRecord {
    AlpacaRecord {
        instruction: i.into(),
        input: inp.into(),
        output: o.into(),
    }
}

#[test]
fn rule_filters() {
    let cfg = FilterConfig {
        max_prompt_chars: 10,
        max_output_chars: 5,
        ..Default::default()
    };
    let cases = [
        (rec("你好", "", "好"), None),
        (rec("  ", "x", "好"), Some("empty_field")),
        (rec("问", "", " \n"), Some("empty_field")),
        (rec("一二三四五六", "七八九十壹", "好"), Some("too_long")),
        (rec("问", "", "一二三四五六"), Some("too_long")),
        (rec("问\u{7}", "", "好"), Some("control_chars")),
        (rec("问", "", "好\u{FFFD}"), Some("control_chars")),
        (rec("问\n\t", "", "好\r\n"), None),
    ];
    for (r, want) in cases {
        assert_eq!(check_record(&r, &cfg), want, "{r:?}");
    }
    let pair = |e: &str, z: &str| TranslationPair {
        english: e.into(),
        chinese: z.into(),
    };
    let d = FilterConfig::default();
    assert_eq!(
        check_pair(&pair("I like tea very much.", "我很喜欢茶。"), &d),
        None
    );
    assert_eq!(
        check_pair(
            &pair("Yes.", "这是一个很长很长的中文句子，和英文完全对不上。"),
            &d
        ),
        Some("length_ratio")
    );
    assert_eq!(check_pair(&pair("", "你好"), &d), Some("empty_field"));
}

/// Character 3-gram set: what MinHash estimates the Jaccard similarity of.
fn grams(s: &str) -> HashSet<Vec<char>> {
    let c: Vec<char> = s.chars().collect();
    if c.len() < 3 {
        return [c].into_iter().collect();
    }
    c.windows(3).map(|w| w.to_vec()).collect()
}

fn jaccard(x: &HashSet<Vec<char>>, y: &HashSet<Vec<char>>) -> f64 {
    x.intersection(y).count() as f64 / x.union(y).count().max(1) as f64
}

#[test]
fn near_duplicates_follow_true_jaccard() {
    let Some(data) = shared() else { return };
    let mut skips = SkipCounts::new();
    let f = data.join("alpaca_zh/llamafactory_alpaca_zh_demo.json");
    let mut prompts: Vec<String> = convert::read_alpaca(&f, false, &mut skips)
        .unwrap()
        .iter()
        .map(|r| Dedup::prompt(&r.value))
        .collect();
    // Edited copies (case, punctuation, spacing) must all be caught.
    let n = prompts.len();
    for i in (0..n).step_by(37) {
        prompts.push(prompts[i].to_uppercase().replace(['，', ','], " ; "));
    }
    let mut dd = Dedup::new(0.85);
    let mut kept: Vec<HashSet<Vec<char>>> = Vec::new();
    let (mut flagged_low, mut missed) = (Vec::new(), Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let g = grams(&normalize(p));
        let best = kept.iter().map(|k| jaccard(k, &g)).fold(0.0f64, f64::max);
        match dd.check(p) {
            // A flagged prompt must really be close to something kept (MinHash with 32 hashes
            // estimating >= 0.85 when the true similarity is < 0.5 is a > 5-sigma event).
            Some(_) if best < 0.5 => flagged_low.push((p.clone(), best)),
            Some(_) => {}
            None => {
                if i >= n || best >= 0.999 {
                    missed.push(p.clone());
                }
                kept.push(g);
            }
        }
    }
    assert!(
        flagged_low.is_empty(),
        "flagged dissimilar prompts: {:?}",
        &flagged_low[..flagged_low.len().min(3)]
    );
    assert!(
        missed.is_empty(),
        "missed copies: {:?}",
        &missed[..missed.len().min(3)]
    );
}

#[test]
fn translation_conversion_uses_both_directions_and_the_templates() {
    let Some(data) = shared() else { return };
    let f = data.join("translation2019zh/translation2019zh_valid_sample_a.json");
    let mut skips = SkipCounts::new();
    let pairs =
        convert::read_json_records(&f, false, &mut skips, convert::parse_translation).unwrap();
    assert_eq!(pairs.len(), 500);
    let cfg = MixConfig {
        seed: 3,
        skip_bad: false,
        filters: FilterConfig::default(),
        sources: vec![SourceSpec {
            name: "t".into(),
            kind: SourceKind::Translation2019zh,
            files: vec![f.clone()],
            count: None,
        }],
    };
    let (recs, stats) = mix(&cfg).unwrap();
    let by_en: std::collections::HashMap<&str, &str> = pairs
        .iter()
        .map(|p| (p.value.english.trim(), p.value.chinese.trim()))
        .collect();
    let by_zh: std::collections::HashMap<&str, &str> = pairs
        .iter()
        .map(|p| (p.value.chinese.trim(), p.value.english.trim()))
        .collect();
    let (mut en2zh, mut zh2en) = (0, 0);
    for r in &recs {
        // Recover the source sentence from the input or from the templated instruction.
        let find = |templates: &[&str]| -> Option<String> {
            templates.iter().find_map(|t| {
                if t.contains("{text}") {
                    let (pre, post) = t.split_once("{text}").unwrap();
                    r.instruction
                        .strip_prefix(pre)
                        .and_then(|s| s.strip_suffix(post))
                        .map(str::to_string)
                } else if r.instruction == *t {
                    Some(r.input.clone())
                } else {
                    None
                }
            })
        };
        if let Some(src) = find(EN_TO_ZH_TEMPLATES).filter(|s| by_en.contains_key(s.as_str())) {
            assert_eq!(by_en[src.as_str()], r.output);
            en2zh += 1;
        } else if let Some(src) = find(ZH_TO_EN_TEMPLATES) {
            assert_eq!(
                by_zh.get(src.as_str()).copied(),
                Some(r.output.as_str()),
                "{r:?}"
            );
            zh2en += 1;
        } else {
            panic!("record from no template: {r:?}");
        }
    }
    assert_eq!(en2zh + zh2en, stats.total as usize);
    // Fair coin over ~500 records: each direction well inside 35%..65%.
    assert!(
        en2zh * 100 > 35 * recs.len() && zh2en * 100 > 35 * recs.len(),
        "{en2zh} vs {zh2en}"
    );
    // Same seed, same output; another seed, another order.
    assert_eq!(mix(&cfg).unwrap().0, recs);
    assert_ne!(
        mix(&MixConfig {
            seed: 4,
            ..cfg.clone()
        })
        .unwrap()
        .0,
        recs
    );
}

#[test]
fn sampling_counts_pclue_mapping_and_recipe_config() {
    let Some(data) = shared() else { return };
    let pclue = data.join("pclue/pCLUE_train_9.json");
    let alpaca = data.join("alpaca_en/alpaca_data_en_sample.json");
    let cfg = MixConfig {
        seed: 9,
        skip_bad: false,
        filters: FilterConfig::default(),
        sources: vec![
            SourceSpec {
                name: "pclue".into(),
                kind: SourceKind::Pclue,
                files: vec![pclue.clone()],
                count: Some(100),
            },
            SourceSpec {
                name: "alpaca".into(),
                kind: SourceKind::Alpaca,
                files: vec![alpaca],
                count: Some(1_000_000),
            },
        ],
    };
    let (recs, stats) = mix(&cfg).unwrap();
    let p = &stats.sources["pclue"];
    assert_eq!(p.kept, 100);
    assert_eq!(p.dropped["sampled_out"], p.passed - 100);
    let a = &stats.sources["alpaca"];
    assert_eq!(a.short_of_target, 1_000_000 - a.kept);
    assert_eq!(recs.len() as u64, p.kept + a.kept);
    // pCLUE records are input → instruction, target → output, empty input.
    let mut skips = SkipCounts::new();
    let raw = convert::read_json_records(&pclue, false, &mut skips, |v| {
        Ok((
            v["input"].as_str().unwrap().to_string(),
            v["target"].as_str().unwrap().to_string(),
        ))
    })
    .unwrap();
    let raw: HashSet<(String, String)> = raw.into_iter().map(|l| l.value).collect();
    let from_pclue = recs
        .iter()
        .filter(|r| raw.contains(&(r.instruction.clone(), r.output.clone())) && r.input.is_empty())
        .count();
    assert_eq!(from_pclue, 100);

    // The shipped recipe parses and holds the recipe's mixture.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/prep_data_recipe.toml"),
    )
    .unwrap();
    let r = RecipeFile::parse(&text).unwrap();
    let counts: Vec<(String, Option<usize>)> = r
        .sources
        .iter()
        .map(|s| (s.name.clone(), s.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("alpaca", Some(50_000)),
            ("alpaca_zh", Some(50_000)),
            ("pclue", Some(300_000)),
            ("translation2019zh", Some(500_000)),
            ("self_instruct", None)
        ]
        .map(|(n, c)| (n.to_string(), c))
    );
}
