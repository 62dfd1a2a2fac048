//! Speed of the crawler's near-duplicate filter (ROUGE-L ≥ 0.7 against everything kept), with
//! brute force as the reference measured in the same run.
//!
//! `cargo run --release --example crawl_dedup_bench -- [N] [BRUTE_N]`
//!
//! Instructions are synthetic but shaped like real ones: the opening 4 characters of a real
//! Chinese instruction (alpaca_zh in ../shared/data) followed by a random stretch of Chinese
//! Wikipedia text (zh_corpus), with lengths drawn from the real instructions; 5% are near copies
//! of an earlier one (two characters changed). Without ../shared/data it says so and stops.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::Instant;
use zhllama::instruct::rouge::{DupCheck, NearDupIndex};

/// CPU seconds (user + system) of this process, from /proc (Linux; 10 ms resolution): the box this
/// runs on is shared, so wall time alone says little.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name; 100 ticks/s.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(1_000_000, |s| s.parse().expect("N"));
    let brute_n: usize = args.get(2).map_or(100_000, |s| s.parse().expect("BRUTE_N"));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data.exists() {
        eprintln!("skipping: {} not found", data.display());
        return;
    }
    let mut instructions: Vec<Vec<char>> = Vec::new();
    for f in [
        "alpaca_zh/llamafactory_alpaca_zh_demo.json",
        "alpaca_zh/ruozhiba_qa2449_gpt4o.json",
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data.join(f)).unwrap()).unwrap();
        for r in v.as_array().unwrap() {
            let s: Vec<char> = r["instruction"].as_str().unwrap().chars().collect();
            if s.len() >= 6 {
                instructions.push(s);
            }
        }
    }
    let wiki: Vec<char> =
        std::fs::read_to_string(data.join("zh_corpus/cmrc2018_wiki_contexts.txt"))
            .unwrap()
            .chars()
            .filter(|c| *c != '\n')
            .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut texts: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        let t: String = if i > 0 && rng.random_bool(0.05) {
            let mut c: Vec<char> = texts[rng.random_range(0..i)].chars().collect();
            for _ in 0..2 {
                let j = rng.random_range(0..c.len());
                c[j] = '改';
            }
            c.into_iter().collect()
        } else {
            let real = &instructions[rng.random_range(0..instructions.len())];
            let len = instructions[rng.random_range(0..instructions.len())]
                .len()
                .clamp(8, 80);
            let start = rng.random_range(0..wiki.len() - len);
            real[..4]
                .iter()
                .chain(&wiki[start..start + len - 4])
                .collect()
        };
        texts.push(t);
    }

    // Fast path: check + insert every record, as the crawler does.
    let mut idx = NearDupIndex::new(0.7);
    let c0 = cpu_secs();
    let t0 = Instant::now();
    let mut checkpoints = Vec::new();
    let mut kept: Vec<&String> = Vec::new();
    let (mut near, mut exact) = (0usize, 0usize);
    for (i, t) in texts.iter().enumerate() {
        let q = idx.encode(t);
        match idx.check(&q) {
            DupCheck::Unique => {
                idx.insert(q);
                kept.push(t);
            }
            DupCheck::Near => near += 1,
            DupCheck::Exact => exact += 1,
        }
        if (i + 1).is_power_of_two() && i + 1 >= 1024 || i + 1 == n {
            checkpoints.push((i + 1, idx.len(), cpu_secs() - c0));
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - c0;
    println!(
        "index: {n} records in {total:.2} s wall, {cpu:.2} s CPU ({:.1} µs CPU/record), kept {}, near {near}, exact {exact}",
        cpu * 1e6 / n as f64,
        idx.len()
    );
    let q = idx.stats.queries as f64;
    println!(
        "  postings read/query {:.1}, candidates/query {:.1}, LCS/query {:.2}",
        idx.stats.postings_read as f64 / q,
        idx.stats.candidates as f64 / q,
        idx.stats.lcs_computed as f64 / q
    );
    let mut prev = (0usize, 0.0f64);
    for (seen, kept, t) in &checkpoints {
        println!(
            "  after {seen:>8} seen ({kept:>8} kept): {:.1} µs CPU/record over the last stretch",
            (t - prev.1) * 1e6 / (seen - prev.0) as f64
        );
        prev = (*seen, *t);
    }

    // Resume: rebuilding the index from the kept records is insert-only.
    let c3 = cpu_secs();
    let mut rebuilt = NearDupIndex::new(0.7);
    for t in &kept {
        let q = rebuilt.encode(t);
        rebuilt.insert(q);
    }
    println!(
        "resume: index rebuilt from {} kept records in {:.2} s CPU",
        kept.len(),
        cpu_secs() - c3
    );

    // Reference: brute-force queries against the first `brute_n` kept records, same queries
    // through a fresh index of the same records.
    let mut small = NearDupIndex::new(0.7);
    let mut enc = Vec::new();
    for t in &texts {
        if small.len() >= brute_n {
            break;
        }
        let q = small.encode(t);
        if small.check(&q) == DupCheck::Unique {
            small.insert(q);
        }
    }
    for t in texts.iter().rev().take(200) {
        enc.push(small.encode(t));
    }
    const REPS: usize = 50;
    let c1 = cpu_secs();
    let mut fast = Vec::new();
    for _ in 0..REPS {
        fast = enc.iter().map(|q| small.near_dups(q)).collect::<Vec<_>>();
    }
    let t_fast = (cpu_secs() - c1) / (REPS * enc.len()) as f64;
    let c2 = cpu_secs();
    let brute: Vec<Vec<u32>> = enc.iter().map(|q| small.near_dups_brute_force(q)).collect();
    let t_brute = (cpu_secs() - c2) / enc.len() as f64;
    assert_eq!(fast, brute, "index and brute force disagree");
    println!(
        "query against {} kept (CPU): index {:.1} µs, brute force {:.0} µs, ratio {:.0}x (same {} queries, identical results)",
        small.len(),
        t_fast * 1e6,
        t_brute * 1e6,
        t_brute / t_fast,
        enc.len()
    );
}
