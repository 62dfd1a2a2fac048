//! Rule filters for instruction records: empty or too-long fields, control characters, the
//! length ratio of translation pairs, and exact / near-duplicate prompts.
//!
//! Near duplicates: the prompt (instruction + input) is normalized (lowercase, only letters and
//! digits kept); equal normalized prompts are duplicates outright, and otherwise a MinHash
//! signature over character 3-grams with LSH banding proposes candidates, kept as duplicates
//! when their estimated Jaccard similarity reaches the threshold. The first occurrence wins.

use super::convert::{AlpacaRecord, TranslationPair};
use crate::util::hash::mix64;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Filter thresholds (all in Unicode scalar values).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FilterConfig {
    /// Longest instruction + input.
    pub max_prompt_chars: usize,
    pub max_output_chars: usize,
    /// Translation pairs: allowed range of English chars / Chinese chars.
    pub min_en_zh_ratio: f64,
    pub max_en_zh_ratio: f64,
    /// Estimated Jaccard similarity (char 3-grams) at which a prompt is a near duplicate.
    pub near_dup_threshold: f64,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            max_prompt_chars: 2048,
            max_output_chars: 4096,
            // translation2019zh sample pairs sit around 3 English chars per Chinese char; this
            // keeps loose pairs and drops misaligned ones (a sentence against a fragment).
            min_en_zh_ratio: 0.8,
            max_en_zh_ratio: 12.0,
            near_dup_threshold: 0.85,
        }
    }
}

/// Why a record was dropped (the names used in the stats report).
pub fn check_record(rec: &AlpacaRecord, cfg: &FilterConfig) -> Option<&'static str> {
    if rec.instruction.trim().is_empty() || rec.output.trim().is_empty() {
        return Some("empty_field");
    }
    let prompt_chars = rec.instruction.chars().count() + rec.input.chars().count();
    if prompt_chars > cfg.max_prompt_chars || rec.output.chars().count() > cfg.max_output_chars {
        return Some("too_long");
    }
    if [&rec.instruction, &rec.input, &rec.output]
        .iter()
        .any(|s| has_bad_chars(s))
    {
        return Some("control_chars");
    }
    None
}

/// Control characters other than newline, tab and carriage return, or U+FFFD (a decoding loss).
pub fn has_bad_chars(s: &str) -> bool {
    s.chars()
        .any(|c| (c.is_control() && !matches!(c, '\n' | '\t' | '\r')) || c == '\u{FFFD}')
}

/// Translation pair check (before conversion): empty sides or an implausible length ratio.
pub fn check_pair(p: &TranslationPair, cfg: &FilterConfig) -> Option<&'static str> {
    let (en, zh) = (p.english.trim(), p.chinese.trim());
    if en.is_empty() || zh.is_empty() {
        return Some("empty_field");
    }
    let ratio = en.chars().count() as f64 / zh.chars().count() as f64;
    if ratio < cfg.min_en_zh_ratio || ratio > cfg.max_en_zh_ratio {
        return Some("length_ratio");
    }
    None
}

/// Lowercase, letters and digits only (drops spaces and punctuation of any script).
pub fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(|c| c.to_lowercase())
        .collect()
}

const NUM_HASHES: usize = 32;
const BANDS: usize = 8;
const ROWS: usize = NUM_HASHES / BANDS;

/// MinHash signature of the character 3-grams of `norm` (the whole string when shorter).
pub fn minhash(norm: &str) -> [u64; NUM_HASHES] {
    let chars: Vec<char> = norm.chars().collect();
    let mut sig = [u64::MAX; NUM_HASHES];
    let n = if chars.len() < 3 { 1 } else { chars.len() - 2 };
    for i in 0..n {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &c in &chars[i..(i + 3).min(chars.len())] {
            h = mix64(h ^ c as u64);
        }
        for (k, s) in sig.iter_mut().enumerate() {
            let v = mix64(h ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            *s = (*s).min(v);
        }
    }
    sig
}

/// Streaming duplicate detector; `check` returns the reason when `prompt` duplicates an earlier
/// one and otherwise remembers it.
pub struct Dedup {
    threshold: f64,
    exact: HashSet<u64>,
    normalized: HashSet<u64>,
    sigs: Vec<[u64; NUM_HASHES]>,
    bands: HashMap<(usize, u64), Vec<u32>>,
}

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Dedup {
    pub fn new(threshold: f64) -> Dedup {
        Dedup {
            threshold,
            exact: HashSet::new(),
            normalized: HashSet::new(),
            sigs: Vec::new(),
            bands: HashMap::new(),
        }
    }

    /// The prompt of a record: instruction, then input.
    pub fn prompt(rec: &AlpacaRecord) -> String {
        format!("{}\n{}", rec.instruction, rec.input)
    }

    pub fn check(&mut self, prompt: &str) -> Option<&'static str> {
        if !self.exact.insert(hash_str(prompt)) {
            return Some("duplicate");
        }
        let norm = normalize(prompt);
        if !self.normalized.insert(hash_str(&norm)) {
            return Some("near_duplicate");
        }
        let sig = minhash(&norm);
        let keys: Vec<(usize, u64)> = (0..BANDS)
            .map(|b| (b, hash_band(&sig[b * ROWS..(b + 1) * ROWS])))
            .collect();
        let mut seen = HashSet::new();
        for k in &keys {
            if let Some(cands) = self.bands.get(k) {
                for &c in cands {
                    if seen.insert(c) {
                        let other = &self.sigs[c as usize];
                        let same = sig.iter().zip(other).filter(|(a, b)| a == b).count();
                        if same as f64 / NUM_HASHES as f64 >= self.threshold {
                            return Some("near_duplicate");
                        }
                    }
                }
            }
        }
        let id = self.sigs.len() as u32;
        self.sigs.push(sig);
        for k in keys {
            self.bands.entry(k).or_default().push(id);
        }
        None
    }
}

fn hash_band(rows: &[u64]) -> u64 {
    rows.iter().fold(0x1234_5678u64, |h, &r| mix64(h ^ r))
}
