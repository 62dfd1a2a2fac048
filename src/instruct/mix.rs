//! The instruction-data mixture: read each source, convert to Alpaca records, filter, drop
//! duplicates (across all sources, first occurrence wins, sources in the order given), sample
//! each source to its target count with a seeded RNG, then mix and shuffle.

use super::convert::{
    AlpacaRecord, SkipCounts, parse_alpaca, parse_pclue, parse_translation, read_json_records,
    translation_to_alpaca,
};
use super::filter::{Dedup, FilterConfig, check_pair, check_record};
use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The input format of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// JSON lines `{english, chinese}`, converted in both directions through templates.
    Translation2019zh,
    /// JSON lines `{input, target, ...}`.
    Pclue,
    /// Alpaca records, JSON array or JSON lines, taken as is (Alpaca en/zh, crawler output).
    Alpaca,
}

/// One source of the mixture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceSpec {
    pub name: String,
    pub kind: SourceKind,
    pub files: Vec<PathBuf>,
    /// Records to sample after filtering (None: keep all).
    pub count: Option<usize>,
}

/// Everything the mixer needs.
#[derive(Clone, Debug)]
pub struct MixConfig {
    pub seed: u64,
    pub skip_bad: bool,
    pub filters: FilterConfig,
    pub sources: Vec<SourceSpec>,
}

/// Per-source counts for the stats report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceStats {
    pub files: Vec<String>,
    /// Records parsed from the files.
    pub read: u64,
    /// Dropped records by rule: input problems (`bad_json`, `missing_field`, `not_utf8`,
    /// `empty_file`, `bad_file`), filters (`empty_field`, `too_long`, `control_chars`,
    /// `length_ratio`, `duplicate`, `near_duplicate`) and `sampled_out`.
    pub dropped: BTreeMap<String, u64>,
    /// Records that passed every filter.
    pub passed: u64,
    pub target: Option<usize>,
    /// Records in the output.
    pub kept: u64,
    /// Target minus kept when the source had too few records.
    pub short_of_target: u64,
}

/// The stats report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MixStats {
    pub seed: u64,
    pub total: u64,
    pub filters: Option<FilterConfig>,
    pub sources: BTreeMap<String, SourceStats>,
}

fn source_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the source name, so each source's RNG does not depend on the others.
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Read, filter, deduplicate, sample and shuffle; returns the mixed records and the report.
pub fn mix(cfg: &MixConfig) -> Result<(Vec<AlpacaRecord>, MixStats)> {
    let mut stats = MixStats {
        seed: cfg.seed,
        filters: Some(cfg.filters.clone()),
        ..Default::default()
    };
    let mut dedup = Dedup::new(cfg.filters.near_dup_threshold);
    let mut out = Vec::new();
    for src in &cfg.sources {
        if stats.sources.contains_key(&src.name) {
            bail!("source `{}` given twice", src.name);
        }
        let mut st = SourceStats {
            files: src.files.iter().map(|f| f.display().to_string()).collect(),
            target: src.count,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(source_seed(cfg.seed, &src.name));
        let count_drop = |st: &mut SourceStats, why: &str| {
            *st.dropped.entry(why.to_string()).or_default() += 1;
        };
        let mut passed = Vec::new();
        for file in &src.files {
            let mut skips = SkipCounts::new();
            let recs: Vec<AlpacaRecord> = match src.kind {
                SourceKind::Alpaca | SourceKind::Pclue => {
                    let parse = if src.kind == SourceKind::Alpaca {
                        parse_alpaca
                    } else {
                        parse_pclue
                    };
                    let recs = read_json_records(file, cfg.skip_bad, &mut skips, parse)?;
                    st.read += recs.len() as u64;
                    recs.into_iter().map(|l| l.value).collect()
                }
                SourceKind::Translation2019zh => {
                    let pairs =
                        read_json_records(file, cfg.skip_bad, &mut skips, parse_translation)?;
                    st.read += pairs.len() as u64;
                    let mut recs = Vec::with_capacity(pairs.len());
                    for p in pairs {
                        if let Some(why) = check_pair(&p.value, &cfg.filters) {
                            count_drop(&mut st, why);
                            continue;
                        }
                        recs.push(translation_to_alpaca(&p.value, &mut rng).0);
                    }
                    recs
                }
            };
            for (why, n) in skips {
                *st.dropped.entry(why).or_default() += n;
            }
            for r in recs {
                if let Some(why) = check_record(&r, &cfg.filters) {
                    count_drop(&mut st, why);
                    continue;
                }
                if let Some(why) = dedup.check(&Dedup::prompt(&r)) {
                    count_drop(&mut st, why);
                    continue;
                }
                passed.push(r);
            }
        }
        st.passed = passed.len() as u64;
        if let Some(target) = src.count {
            if passed.len() > target {
                let mut keep: Vec<usize> =
                    rand::seq::index::sample(&mut rng, passed.len(), target).into_vec();
                keep.sort_unstable();
                let dropped = passed.len() - target;
                passed = keep
                    .into_iter()
                    .map(|i| std::mem::take(&mut passed[i]))
                    .collect();
                *st.dropped.entry("sampled_out".into()).or_default() += dropped as u64;
            } else {
                st.short_of_target = (target - passed.len()) as u64;
            }
        }
        st.kept = passed.len() as u64;
        out.extend(passed);
        stats.sources.insert(src.name.clone(), st);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    out.shuffle(&mut rng);
    stats.total = out.len() as u64;
    Ok((out, stats))
}

/// The `--config` TOML of `prep-data` (see tools/prep_data_recipe.toml).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub seed: Option<u64>,
    pub output: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    pub skip_bad: Option<bool>,
    #[serde(default)]
    pub filters: FilterConfig,
    /// Sources in priority order (duplicates keep the earlier source's record).
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceSpec>,
}

impl RecipeFile {
    pub fn parse(text: &str) -> Result<RecipeFile> {
        Ok(toml::from_str(text)?)
    }
}

/// Write `records` as one JSON array, a record per line, atomically.
pub fn write_records(path: &std::path::Path, records: &[AlpacaRecord]) -> Result<()> {
    let mut buf = Vec::with_capacity(records.len() * 256);
    buf.extend_from_slice(b"[\n");
    for (i, r) in records.iter().enumerate() {
        serde_json::to_writer(&mut buf, r)?;
        buf.extend_from_slice(if i + 1 < records.len() { b",\n" } else { b"\n" });
    }
    buf.extend_from_slice(b"]\n");
    crate::util::write_atomic(path, &buf)
}
