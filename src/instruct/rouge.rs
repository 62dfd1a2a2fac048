//! ROUGE-L between instructions, and a near-duplicate index that finds every kept instruction with
//! ROUGE-L F ≥ τ without comparing against all of them.
//!
//! Tokens: each CJK / kana / hangul character is one token; runs of other alphanumeric characters
//! are one (lower-cased) word; everything else separates. This is what self-instruct's ROUGE-L does
//! for English, extended so that Chinese (written without spaces) is compared character by character.
//!
//! ROUGE-L F (β = 1, as `rouge_score` reports `fmeasure`) = 2·LCS / (m + n).
//!
//! The index is a prefix filter (the AllPairs / PPJoin idea): treat a token sequence as the set of
//! (token, k-th occurrence) elements, so multiset overlap is set overlap, and LCS ≤ overlap. Sort
//! elements by a global order (rarest first). F ≥ τ needs overlap ≥ α_min(n) = ⌈τn/(2−τ)⌉ for either
//! side, so two sequences that can reach τ share an element within their first n − α_min(n) + 1
//! elements. Only those prefix elements are indexed and probed; candidates then pass a length
//! filter, the exact overlap bound, and only then the O(mn) LCS.

use std::collections::HashMap;

/// True for characters that are written without spaces between words and so are tokens by themselves.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // hiragana, katakana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0x20000..=0x3134F  // CJK extensions B..G
    )
}

/// Split `text` into ROUGE tokens (see the module doc).
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Length of the longest common subsequence of `a` and `b` (two-row dynamic programme, O(|a|·|b|)).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (a, b) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut prev = vec![0u32; b.len() + 1];
    let mut cur = vec![0u32; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()] as usize
}

/// ROUGE-L F-measure of two token sequences: 2·LCS / (m + n); 0 when both are empty.
pub fn rouge_l_tokens<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 0.0;
    }
    2.0 * lcs_len(a, b) as f64 / (a.len() + b.len()) as f64
}

/// ROUGE-L F-measure of two texts under [`tokenize`].
pub fn rouge_l(a: &str, b: &str) -> f64 {
    rouge_l_tokens(&tokenize(a), &tokenize(b))
}

/// True when an LCS of `lcs` between sequences of `m` and `n` tokens gives ROUGE-L F ≥ `t`
/// (with 1e-9 of slack so 2·LCS/(m+n) = t exactly counts despite float rounding).
pub fn reaches(lcs: usize, m: usize, n: usize, t: f64) -> bool {
    m + n > 0 && 2.0 * lcs as f64 >= t * (m + n) as f64 - 1e-9
}

/// Smallest LCS with which sequences of `m` and `n` tokens reach ROUGE-L F ≥ `t` (the same
/// inequality as [`reaches`], solved for the LCS).
fn needed(m: usize, n: usize, t: f64) -> usize {
    ((t * (m + n) as f64 - 1e-9) / 2.0).ceil().max(0.0) as usize
}

/// One stored sequence: tokens in text order (for the LCS) and sorted (for the overlap bound).
struct Doc {
    tokens: Box<[u32]>,
    sorted: Box<[u32]>,
}

/// Kept instructions, searchable for near duplicates (ROUGE-L F ≥ `threshold`) and exact duplicates.
pub struct NearDupIndex {
    threshold: f64,
    words: HashMap<String, u32>,
    docs: Vec<Doc>,
    /// Exact-duplicate lookup: hash of the token sequence → doc ids with that hash.
    exact: HashMap<u64, Vec<u32>>,
    /// Document frequency per token, live and as frozen at the last reindex (the element order).
    df_live: HashMap<u32, u32>,
    df_order: HashMap<u32, u32>,
    /// Prefix element (token << 16 | occurrence) → postings `id << 32 | position << 16 | length`,
    /// position being the element's rank within its sequence's ordered elements.
    postings: HashMap<u64, Vec<u64>>,
    docs_at_reindex: usize,
    /// `min_overlap[n]`, cached.
    min_overlap: Vec<usize>,
    /// Per-query scratch per doc id: visit stamp, overlap count so far (−1: pruned).
    scratch: Vec<(u32, i32)>,
    query_no: u32,
    /// Counters for reporting how much the filter prunes.
    pub stats: IndexStats,
}

/// How much work near-duplicate queries did.
#[derive(Clone, Copy, Debug, Default)]
pub struct IndexStats {
    pub queries: u64,
    /// Posting entries read.
    pub postings_read: u64,
    /// Distinct stored sequences reached through postings (after the length filter).
    pub candidates: u64,
    /// Candidates left after the positional and overlap bounds, whose LCS was computed.
    pub lcs_computed: u64,
}

/// Outcome of [`NearDupIndex::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DupCheck {
    Unique,
    Exact,
    Near,
}

/// Common elements a qualifying pair is guaranteed to show within both prefixes (the ℓ-prefix
/// scheme with ℓ = 2): one more element indexed per sequence, in exchange for dropping, unverified,
/// the many candidates that share a single prefix element by chance.
const PREFIX_SHARE: usize = 2;
/// First code of interned words: above every Unicode scalar, so CJK tokens can be their code point.
const WORD_BASE: u32 = 0x11_0000;
/// Positions, lengths and occurrences are packed in 16 bits: longer sequences are not indexed
/// (the crawler's length filter keeps instructions far below this).
const MAX_LEN: usize = u16::MAX as usize;

fn hash_tokens(t: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// Whether the multiset intersection of two sorted sequences (an upper bound on their LCS) has
/// at least `need` elements; gives up as soon as what is left cannot get there.
fn overlap_at_least(a: &[u32], b: &[u32], need: usize) -> bool {
    let (mut i, mut j, mut c) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        if c + (a.len() - i).min(b.len() - j) < need {
            return false;
        }
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                c += 1;
                i += 1;
                j += 1;
            }
        }
    }
    c >= need
}

impl NearDupIndex {
    /// An empty index that flags pairs with ROUGE-L F ≥ `threshold` (0 < threshold ≤ 1).
    pub fn new(threshold: f64) -> Self {
        assert!(
            threshold > 0.0 && threshold <= 1.0,
            "ROUGE-L threshold must be in (0, 1], got {threshold}"
        );
        NearDupIndex {
            threshold,
            words: HashMap::new(),
            docs: Vec::new(),
            exact: HashMap::new(),
            df_live: HashMap::new(),
            df_order: HashMap::new(),
            postings: HashMap::new(),
            docs_at_reindex: 0,
            min_overlap: Vec::new(),
            scratch: Vec::new(),
            query_no: 0,
            stats: IndexStats::default(),
        }
    }

    /// Number of stored sequences.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Token ids of `text`; new words are interned.
    pub fn encode(&mut self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for t in tokenize(text) {
            let mut cs = t.chars();
            let c = cs.next().unwrap();
            if cs.next().is_none() && is_cjk(c) {
                out.push(c as u32);
            } else {
                let next = WORD_BASE + self.words.len() as u32;
                out.push(*self.words.entry(t).or_insert(next));
            }
        }
        out
    }

    /// Smallest LCS any partner needs with a sequence of `n` tokens to reach the threshold: the
    /// minimum of [`needed`] over every partner length m for which it is attainable (≤ min(m, n)).
    /// Computed by enumeration, so it agrees with `reaches` exactly; n + 1 when nothing can reach.
    fn min_overlap(&mut self, n: usize) -> usize {
        while self.min_overlap.len() <= n {
            let k = self.min_overlap.len();
            let t = self.threshold;
            let v = (1..=2 * k + 2)
                .map(|m| needed(m, k, t))
                .zip(1..)
                .filter(|&(need, m)| need <= m.min(k))
                .map(|(need, _)| need)
                .min()
                .unwrap_or(k + 1);
            self.min_overlap.push(v.max(1));
        }
        self.min_overlap[n]
    }

    /// Elements of `tokens` in the frozen global order: (df, token, occurrence) ascending, so the
    /// rarest come first. Packed as `token << 16 | occurrence`.
    fn ordered(&self, tokens: &[u32]) -> Vec<u64> {
        let mut occ: HashMap<u32, u32> = HashMap::with_capacity(tokens.len());
        let mut elems: Vec<(u32, u32, u32)> = tokens
            .iter()
            .map(|&t| {
                let k = occ.entry(t).or_insert(0);
                *k += 1;
                (self.df_order.get(&t).copied().unwrap_or(0), t, *k - 1)
            })
            .collect();
        elems.sort_unstable();
        elems
            .iter()
            .map(|&(_, t, k)| ((t as u64) << 16) | k as u64)
            .collect()
    }

    /// Length of the prefix of an ordered sequence of `n` elements that is indexed/probed:
    /// n − α_min(n) + [`PREFIX_SHARE`]. Two sequences sharing α ≥ α_min elements share their
    /// PREFIX_SHARE smallest common elements within both such prefixes (each has at least
    /// α − PREFIX_SHARE common elements after it), so a pair reaching the threshold is always found
    /// with at least min(PREFIX_SHARE, α) prefix matches.
    fn prefix_len(&mut self, n: usize) -> usize {
        (n + PREFIX_SHARE)
            .saturating_sub(self.min_overlap(n))
            .min(n)
    }

    /// Ids of every stored sequence with ROUGE-L F ≥ threshold against `q` (all of them, for tests
    /// and audits; [`NearDupIndex::check`] stops at the first).
    pub fn near_dups(&mut self, q: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        self.search(q, |id| {
            out.push(id);
            false
        });
        out.sort_unstable();
        out
    }

    /// Calls `hit(id)` for each stored sequence reaching the threshold; stops when it returns true.
    ///
    /// Probe the query's prefix elements; for each posting (doc c, its position j, its length n):
    /// - length filter: n must allow F ≥ t at all (LCS ≤ min(m, n));
    /// - positional filter (PPJoin): with matches found so far A, the overlap is at most
    ///   A + 1 + min(m − i − 1, n − j − 1), because every common element ordered before this one
    ///   lies in both prefixes and has been counted; below [`needed`] the doc is dropped;
    ///
    /// Survivors then face the multiset overlap of the whole sequences, and last the LCS.
    fn search(&mut self, q: &[u32], mut hit: impl FnMut(u32) -> bool) {
        self.stats.queries += 1;
        let m = q.len();
        if m == 0 || m > MAX_LEN || self.docs.is_empty() {
            return;
        }
        self.query_no = self.query_no.wrapping_add(1);
        if self.query_no == 0 {
            self.scratch.iter_mut().for_each(|s| s.0 = 0);
            self.query_no = 1;
        }
        let qno = self.query_no;
        let t = self.threshold;
        let elems = self.ordered(q);
        let p = self.prefix_len(m);
        // Length filter as a table: need[n - lo] for the partner lengths lo..=hi that can reach t.
        let lo = (1..=m).find(|&n| needed(m, n, t) <= n).unwrap_or(m + 1);
        let hi = (m..=MAX_LEN)
            .take_while(|&n| needed(m, n, t) <= m)
            .last()
            .unwrap_or(0);
        let need: Vec<u32> = (lo..=hi).map(|n| needed(m, n, t) as u32).collect();
        let mut cands: Vec<u32> = Vec::new();
        for (i, e) in elems[..p].iter().enumerate() {
            let Some(list) = self.postings.get(e) else {
                continue;
            };
            self.stats.postings_read += list.len() as u64;
            let rest_q = (m - i - 1) as i32;
            for &post in list {
                let n = (post & 0xFFFF) as usize;
                if n < lo || n > hi {
                    continue;
                }
                let id = (post >> 32) as usize;
                let j = ((post >> 16) & 0xFFFF) as i32;
                let slot = &mut self.scratch[id];
                if slot.0 != qno {
                    *slot = (qno, 0);
                    cands.push(id as u32);
                } else if slot.1 < 0 {
                    continue;
                }
                let bound = slot.1 + 1 + rest_q.min(n as i32 - j - 1);
                slot.1 = if bound < need[n - lo] as i32 {
                    -1
                } else {
                    slot.1 + 1
                };
            }
        }
        self.stats.candidates += cands.len() as u64;
        let mut qs = q.to_vec();
        qs.sort_unstable();
        for id in cands {
            if self.scratch[id as usize].1 < 0 {
                continue;
            }
            let d = &self.docs[id as usize];
            let n = d.tokens.len();
            let need = needed(m, n, t);
            if (self.scratch[id as usize].1 as usize) < need.min(PREFIX_SHARE)
                || !overlap_at_least(&qs, &d.sorted, need)
            {
                continue;
            }
            self.stats.lcs_computed += 1;
            if reaches(lcs_len(q, &d.tokens), m, n, t) && hit(id) {
                return;
            }
        }
    }

    /// Exact duplicate, near duplicate or unique, against what is stored.
    pub fn check(&mut self, q: &[u32]) -> DupCheck {
        if let Some(ids) = self.exact.get(&hash_tokens(q))
            && ids.iter().any(|&i| *self.docs[i as usize].tokens == *q)
        {
            return DupCheck::Exact;
        }
        let mut near = false;
        self.search(q, |_| {
            near = true;
            true
        });
        if near {
            DupCheck::Near
        } else {
            DupCheck::Unique
        }
    }

    /// Add doc `id`'s prefix elements to the postings.
    fn index_doc(&mut self, id: usize) {
        let n = self.docs[id].tokens.len();
        if n == 0 || n > MAX_LEN {
            return;
        }
        let elems = self.ordered(&self.docs[id].tokens);
        let p = self.prefix_len(n);
        for (j, e) in elems[..p].iter().enumerate() {
            let post = ((id as u64) << 32) | ((j as u64) << 16) | n as u64;
            self.postings.entry(*e).or_default().push(post);
        }
    }

    /// Store `tokens` (whether or not it duplicates something) and return its id.
    pub fn insert(&mut self, tokens: Vec<u32>) -> u32 {
        let id = self.docs.len();
        assert!(id < u32::MAX as usize, "near-duplicate index full");
        self.exact
            .entry(hash_tokens(&tokens))
            .or_default()
            .push(id as u32);
        let mut sorted = tokens.clone();
        sorted.sort_unstable();
        let mut prev = None;
        for &t in &sorted {
            if prev != Some(t) {
                *self.df_live.entry(t).or_insert(0) += 1;
                prev = Some(t);
            }
        }
        self.docs.push(Doc {
            tokens: tokens.into_boxed_slice(),
            sorted: sorted.into_boxed_slice(),
        });
        self.scratch.push((0, 0));
        // Re-derive the element order from current frequencies each time the store doubles:
        // amortised O(total tokens), and keeps the rarest-first order close to the data's.
        if self.docs.len() >= 64 && self.docs.len() >= 2 * self.docs_at_reindex {
            self.reindex();
        } else {
            self.index_doc(id);
        }
        id as u32
    }

    /// Freeze the live document frequencies as the element order and rebuild all postings.
    fn reindex(&mut self) {
        self.df_order = self.df_live.clone();
        self.postings.clear();
        for id in 0..self.docs.len() {
            self.index_doc(id);
        }
        self.docs_at_reindex = self.docs.len();
    }

    /// Brute force: ids of every stored sequence with ROUGE-L F ≥ threshold (the reference the
    /// index is tested against).
    pub fn near_dups_brute_force(&self, q: &[u32]) -> Vec<u32> {
        let t = self.threshold;
        (0..self.docs.len() as u32)
            .filter(|&i| {
                let d = &self.docs[i as usize].tokens;
                reaches(lcs_len(q, d), q.len(), d.len(), t)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Textbook LCS by full-table recursion, independent of `lcs_len`'s two-row form.
    fn lcs_reference(a: &[char], b: &[char]) -> usize {
        let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                t[i][j] = if a[i] == b[j] {
                    1 + t[i + 1][j + 1]
                } else {
                    t[i + 1][j].max(t[i][j + 1])
                };
            }
        }
        t[0][0]
    }

    fn random_text(rng: &mut ChaCha8Rng, alphabet: &[char], max_len: usize) -> String {
        let n = rng.random_range(0..=max_len);
        (0..n)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect()
    }

    #[test]
    fn tokenize_cases() {
        let check = |text: &str, want: &[&str]| assert_eq!(tokenize(text), want, "{text:?}");
        check("", &[]);
        check("写一首诗", &["写", "一", "首", "诗"]);
        check("Hello, World!", &["hello", "world"]);
        check(
            "用Python写GPT-2代码",
            &["用", "python", "写", "gpt", "2", "代", "码"],
        );
        check("  ，。！ ", &[]);
        check("カタカナ한국", &["カ", "タ", "カ", "ナ", "한", "국"]);
    }

    #[test]
    fn lcs_matches_reference_on_random_strings() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let alphabet: Vec<char> = "abc一二三".chars().collect();
        for _ in 0..2000 {
            let a: Vec<char> = random_text(&mut rng, &alphabet, 25).chars().collect();
            let b: Vec<char> = random_text(&mut rng, &alphabet, 25).chars().collect();
            assert_eq!(lcs_len(&a, &b), lcs_reference(&a, &b), "{a:?} {b:?}");
        }
    }

    #[test]
    fn rouge_l_known_values() {
        // LCS("abcd","acbd") = 3 ("abd"): F = 2·3/8.
        assert!(
            (rouge_l_tokens(&['a', 'b', 'c', 'd'], &['a', 'c', 'b', 'd']) - 0.75).abs() < 1e-12
        );
        assert_eq!(rouge_l("请写一首诗", "请写一首诗"), 1.0);
        assert_eq!(rouge_l("", ""), 0.0);
        // "the cat sat" vs "the cat ran": LCS 2 of 3+3 words.
        assert!((rouge_l("The cat sat.", "the CAT ran") - 4.0 / 6.0).abs() < 1e-12);
    }

    /// The pruned search returns exactly the brute-force set, for many thresholds, on random
    /// strings over small alphabets (so near duplicates are common) inserted one by one; the
    /// inserts cross several reindexes.
    #[test]
    fn pruned_search_equals_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (alphabet, threshold) in [
            ("ab一二", 0.7),
            ("abcde一二三四五", 0.7),
            ("abc", 0.5),
            ("一二三四", 0.9),
            ("ab一", 1.0),
        ] {
            let alphabet: Vec<char> = alphabet.chars().collect();
            let mut idx = NearDupIndex::new(threshold);
            let mut hits = 0;
            for i in 0..600 {
                // Mix fresh strings with mutated copies of stored ones to get many true hits.
                let text = if i > 0 && rng.random_bool(0.4) {
                    let mut base: Vec<char> =
                        random_text(&mut rng, &alphabet, 18).chars().collect();
                    if !base.is_empty() {
                        let j = rng.random_range(0..base.len());
                        base[j] = alphabet[rng.random_range(0..alphabet.len())];
                    }
                    base.into_iter().collect()
                } else {
                    random_text(&mut rng, &alphabet, 18)
                };
                // Spaces between Latin letters make each one a word token.
                let spaced: String = text.chars().flat_map(|c| [c, ' ']).collect();
                let q = idx.encode(&spaced);
                let fast = idx.near_dups(&q);
                let brute = idx.near_dups_brute_force(&q);
                assert_eq!(fast, brute, "query {spaced:?} threshold {threshold}");
                hits += brute.len();
                let want = if idx.docs.iter().any(|d| *d.tokens == *q.as_slice()) {
                    DupCheck::Exact
                } else if brute.is_empty() {
                    DupCheck::Unique
                } else {
                    DupCheck::Near
                };
                assert_eq!(idx.check(&q), want);
                idx.insert(q);
            }
            assert!(hits > 100, "test too easy: only {hits} hits");
        }
    }

    #[test]
    fn brute_force_agrees_with_string_rouge() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let alphabet: Vec<char> = "ab一二三".chars().collect();
        let mut idx = NearDupIndex::new(0.7);
        let mut texts = Vec::new();
        for _ in 0..200 {
            let t = random_text(&mut rng, &alphabet, 12);
            let spaced: String = t.chars().flat_map(|c| [c, ' ']).collect();
            let q = idx.encode(&spaced);
            let brute = idx.near_dups_brute_force(&q);
            let want: Vec<u32> = texts
                .iter()
                .enumerate()
                .filter(|(_, s): &(usize, &String)| rouge_l(&spaced, s) >= 0.7 - 1e-9)
                .map(|(i, _)| i as u32)
                .collect();
            assert_eq!(brute, want);
            idx.insert(q);
            texts.push(spaced);
        }
    }
}
