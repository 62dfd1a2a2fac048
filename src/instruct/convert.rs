//! Instruction-data sources read into Alpaca records: Alpaca JSON arrays or JSON lines (Stanford
//! Alpaca, the Chinese Alpaca sets, crawler output), translation2019zh pairs (both directions,
//! through instruction templates) and pCLUE (`input` → instruction, `target` → output).
//!
//! Malformed input never panics: by default the first problem is a one-line error naming the
//! file and line; with `skip_bad` the record (or, for an unparseable JSON array, the file) is
//! skipped and counted under a reason in [`SkipCounts`].

use anyhow::{Context, Result, bail};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One instruction record, as the recipe's JSON holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpacaRecord {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// Counts of skipped input by reason (`not_utf8`, `bad_json`, `missing_field`, `empty_file`,
/// `bad_file`).
pub type SkipCounts = BTreeMap<String, u64>;

/// A record with where it came from, for error messages.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
}

fn bump(skips: &mut SkipCounts, reason: &str) {
    *skips.entry(reason.to_string()).or_default() += 1;
}

/// 1-based line of every top-level element start of a JSON array (a light scanner that tracks
/// strings and nesting depth; only called on text serde_json already parsed).
fn array_element_lines(text: &[u8]) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut line, mut in_str, mut esc) = (0usize, 1usize, false, false);
    let mut expect_elem = false;
    for &b in text {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        if depth == 1 && expect_elem && !b.is_ascii_whitespace() && b != b']' {
            lines.push(line);
            expect_elem = false;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_elem = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_elem = true,
            _ => {}
        }
    }
    lines
}

/// Parse every JSON value of `path`: a JSON array (one value per element) or JSON lines (one per
/// non-blank line). `parse` turns a value into a record or says what is missing.
pub fn read_json_records<T>(
    path: &Path,
    skip_bad: bool,
    skips: &mut SkipCounts,
    parse: impl Fn(&Value) -> std::result::Result<T, String>,
) -> Result<Vec<Located<T>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let Some(first) = first else {
        if skip_bad {
            bump(skips, "empty_file");
            return Ok(Vec::new());
        }
        bail!("{}: empty file", path.display());
    };
    let mut out = Vec::new();
    if first == b'[' {
        let values: Vec<Value> = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                if skip_bad {
                    bump(skips, "bad_file");
                    return Ok(Vec::new());
                }
                bail!("{}:{}: bad JSON array: {e}", path.display(), e.line());
            }
        };
        let lines = array_element_lines(&bytes);
        for (i, v) in values.iter().enumerate() {
            let line = lines.get(i).copied().unwrap_or(0);
            match parse(v) {
                Ok(r) => out.push(Located { value: r, line }),
                Err(msg) => {
                    if skip_bad {
                        bump(skips, "missing_field");
                        continue;
                    }
                    bail!("{}:{line}: record {i}: {msg}", path.display());
                }
            }
        }
        return Ok(out);
    }
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                if skip_bad {
                    bump(skips, "not_utf8");
                    continue;
                }
                bail!(
                    "{}:{line}: not valid UTF-8 (byte {} of the line)",
                    path.display(),
                    e.valid_up_to()
                );
            }
        };
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                if skip_bad {
                    bump(skips, "bad_json");
                    continue;
                }
                bail!("{}:{line}: bad JSON: {e}", path.display());
            }
        };
        match parse(&v) {
            Ok(r) => out.push(Located { value: r, line }),
            Err(msg) => {
                if skip_bad {
                    bump(skips, "missing_field");
                    continue;
                }
                bail!("{}:{line}: {msg}", path.display());
            }
        }
    }
    Ok(out)
}

fn str_field(v: &Value, key: &str, required: bool) -> std::result::Result<String, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "record is not a JSON object".to_string())?;
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None if !required => Ok(String::new()),
        None | Some(Value::Null) => Err(format!("missing field `{key}`")),
        Some(other) => Err(format!("field `{key}` is not a string ({other})")),
    }
}

/// `{instruction, input?, output}` (a missing or null `input` is empty, as the original treats
/// `None`).
pub fn parse_alpaca(v: &Value) -> std::result::Result<AlpacaRecord, String> {
    Ok(AlpacaRecord {
        instruction: str_field(v, "instruction", true)?,
        input: str_field(v, "input", false)?,
        output: str_field(v, "output", true)?,
    })
}

/// A translation2019zh pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslationPair {
    pub english: String,
    pub chinese: String,
}

pub fn parse_translation(v: &Value) -> std::result::Result<TranslationPair, String> {
    Ok(TranslationPair {
        english: str_field(v, "english", true)?,
        chinese: str_field(v, "chinese", true)?,
    })
}

/// pCLUE: `input` becomes the instruction, `target` the output.
pub fn parse_pclue(v: &Value) -> std::result::Result<AlpacaRecord, String> {
    Ok(AlpacaRecord {
        instruction: str_field(v, "input", true)?,
        input: String::new(),
        output: str_field(v, "target", true)?,
    })
}

/// Alpaca records of a JSON array or JSON-lines file.
pub fn read_alpaca(
    path: &Path,
    skip_bad: bool,
    skips: &mut SkipCounts,
) -> Result<Vec<Located<AlpacaRecord>>> {
    read_json_records(path, skip_bad, skips, parse_alpaca)
}

/// Translation direction of a converted pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    EnToZh,
    ZhToEn,
}

/// Instruction templates per direction: `{text}` is replaced by the source sentence; a template
/// without `{text}` takes the sentence as the record's `input`.
pub const EN_TO_ZH_TEMPLATES: &[&str] = &[
    "将下面的英文句子翻译成中文。",
    "请把这段英文翻译成中文：\n{text}",
    "Translate the following English sentence into Chinese.",
    "这句英文是什么意思？请给出通顺的中文译文。",
    "{text}\n把上面这句话翻译成中文。",
    "你是一名专业译者。请将以下英文内容准确地译为中文。",
];
pub const ZH_TO_EN_TEMPLATES: &[&str] = &[
    "将下面的中文句子翻译成英文。",
    "请把这段中文翻译成英文：\n{text}",
    "Translate the following Chinese sentence into English.",
    "下面这句话用英语怎么说？",
    "{text}\n把上面这句话翻译成英文。",
    "你是一名专业译者。请将以下中文内容准确地译为英文。",
];

/// One Alpaca record from a pair: a random direction and template (from `rng`).
pub fn translation_to_alpaca(
    pair: &TranslationPair,
    rng: &mut impl rand::Rng,
) -> (AlpacaRecord, Direction) {
    let dir = if rng.random_bool(0.5) {
        Direction::EnToZh
    } else {
        Direction::ZhToEn
    };
    let (templates, src, tgt) = match dir {
        Direction::EnToZh => (EN_TO_ZH_TEMPLATES, &pair.english, &pair.chinese),
        Direction::ZhToEn => (ZH_TO_EN_TEMPLATES, &pair.chinese, &pair.english),
    };
    let t = templates[rng.random_range(0..templates.len())];
    let rec = if t.contains("{text}") {
        AlpacaRecord {
            instruction: t.replace("{text}", src.trim()),
            input: String::new(),
            output: tgt.trim().to_string(),
        }
    } else {
        AlpacaRecord {
            instruction: t.to_string(),
            input: src.trim().to_string(),
            output: tgt.trim().to_string(),
        }
    };
    (rec, dir)
}
