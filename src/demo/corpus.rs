//! The demo's built-in data, generated procedurally from a seed: a small bilingual corpus (the
//! stand-in for LLaMA's pre-training text), a Chinese corpus (for the vocabulary and the two
//! pre-training stages) and instruction tasks whose answers can be checked exactly.
//!
//! Tasks are chosen so that a tiny model can learn the *skill* in a minute on 2 cores and the
//! held-out set measures that skill on instances it never saw: every held-out record uses a
//! (task, arguments) combination absent from the training records.

use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;

pub use crate::instruct::convert::AlpacaRecord as Record;

/// Everything the demo trains and evaluates on.
pub struct DemoData {
    /// Mostly English with a little Chinese: trains the base vocabulary and the base model.
    pub base_corpus: Vec<String>,
    /// Chinese text: trains the Chinese vocabulary and pre-training stages 1 and 2.
    pub zh_corpus: Vec<String>,
    /// Chinese text never trained on, for held-out loss after each stage.
    pub zh_heldout: Vec<String>,
    pub sft_train: Vec<Record>,
    pub sft_heldout: Vec<Record>,
}

const ZH_NAMES: &[&str] = &[
    "小明",
    "小红",
    "李雷",
    "韩梅梅",
    "王芳",
    "张伟",
    "刘洋",
    "陈静",
    "杨帆",
    "赵磊",
    "黄丽",
    "周杰",
    "吴敏",
    "徐强",
    "孙悦",
    "马超",
    "朱琳",
    "胡军",
    "郭晶",
    "林涛",
];
const ZH_CITIES: &[&str] = &[
    "北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安", "重庆", "天津", "苏州",
    "长沙", "青岛", "厦门", "昆明",
];
const ZH_FOODS: &[&str] = &[
    "米饭", "面条", "饺子", "包子", "苹果", "香蕉", "西瓜", "豆腐", "鱼", "鸡蛋", "火锅", "月饼",
];
const ZH_THINGS: &[&str] = &[
    "书",
    "电脑",
    "自行车",
    "手机",
    "雨伞",
    "杯子",
    "椅子",
    "桌子",
    "钢笔",
    "帽子",
];
const ZH_ADJ: &[&str] = &["好", "热", "冷", "晴朗", "潮湿", "凉快", "暖和", "干燥"];
const ZH_DIGITS: &[&str] = &["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"];
const EN_NAMES: &[&str] = &[
    "Tom", "Anna", "Mike", "Lucy", "John", "Emma", "Jack", "Lily", "Sam", "Kate",
];
const EN_CITIES: &[&str] = &[
    "London", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Boston", "Sydney",
];
const EN_FOODS: &[&str] = &[
    "rice", "bread", "apples", "noodles", "fish", "cheese", "soup", "cake",
];
const EN_WORDS: &[&str] = &[
    "apple", "river", "green", "house", "light", "table", "music", "water", "stone", "paper",
    "cloud", "happy", "quick", "sound", "plant", "train", "smile", "bread", "night", "world",
];

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &'a [&'a str]) -> &'a str {
    xs.choose(rng).expect("non-empty list")
}

/// A Chinese numeral for 0..=9999 in the everyday reading (e.g. 305 → 三百零五).
pub fn zh_number(n: u32) -> String {
    assert!(n < 10000, "zh_number covers 0..=9999");
    if n == 0 {
        return ZH_DIGITS[0].to_string();
    }
    let units = ["千", "百", "十", ""];
    let digits = [n / 1000, n / 100 % 10, n / 10 % 10, n % 10];
    let mut s = String::new();
    let mut pending_zero = false;
    for (i, &d) in digits.iter().enumerate() {
        if d == 0 {
            pending_zero = !s.is_empty();
            continue;
        }
        if pending_zero {
            s.push_str(ZH_DIGITS[0]);
            pending_zero = false;
        }
        // 10..=19 read 十, 十一 … rather than 一十, 一十一.
        if !(i == 2 && d == 1 && s.is_empty()) {
            s.push_str(ZH_DIGITS[d as usize]);
        }
        s.push_str(units[i]);
    }
    s
}

fn zh_sentence(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, ZH_NAMES);
    match rng.random_range(0..12) {
        0 => format!("{name}住在{}。", pick(rng, ZH_CITIES)),
        // Sentences that restate a part of themselves: the skills the tasks need (copying a
        // span, reformatting a date, reading a numeral, reordering) appear in the plain text.
        8 => {
            let (city, food) = (pick(rng, ZH_CITIES), pick(rng, ZH_FOODS));
            format!("{name}在{city}吃了{food}，那个城市是{city}。")
        }
        9 => {
            let (y, m, d) = (
                rng.random_range(1990..2030),
                rng.random_range(1..13),
                rng.random_range(1..29),
            );
            format!("{y}年{m}月{d}日，写作{y}-{m:02}-{d:02}。")
        }
        10 => {
            let n = rng.random_range(0..10000);
            format!("{}写成数字是{n}。", zh_number(n))
        }
        11 => {
            let (a, b) = (pick(rng, ZH_FOODS), pick(rng, ZH_FOODS));
            format!("先说{a} {b}，反过来说是{b} {a}。")
        }
        1 => format!(
            "{name}喜欢吃{}，也喜欢吃{}。",
            pick(rng, ZH_FOODS),
            pick(rng, ZH_FOODS)
        ),
        2 => format!(
            "今天{}的天气很{}。",
            pick(rng, ZH_CITIES),
            pick(rng, ZH_ADJ)
        ),
        3 => format!("{name}买了一个新{}。", pick(rng, ZH_THINGS)),
        4 => {
            let (y, m, d) = (
                rng.random_range(1990..2030),
                rng.random_range(1..13),
                rng.random_range(1..29),
            );
            format!("{name}在{y}年{m}月{d}日去了{}。", pick(rng, ZH_CITIES))
        }
        5 => {
            let n = rng.random_range(0..10000);
            format!("{}等于{n}。", zh_number(n))
        }
        6 => format!(
            "{name}和{}一起去{}吃{}。",
            pick(rng, ZH_NAMES),
            pick(rng, ZH_CITIES),
            pick(rng, ZH_FOODS)
        ),
        _ => format!(
            "{name}的{}放在{}上。",
            pick(rng, ZH_THINGS),
            pick(rng, &["桌子", "椅子", "床", "书架"])
        ),
    }
}

fn en_sentence(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, EN_NAMES);
    match rng.random_range(0..6) {
        0 => format!("{name} lives in {}.", pick(rng, EN_CITIES)),
        5 => {
            let city = pick(rng, EN_CITIES);
            format!("{name} lives in {city}. Where does {name} live? In {city}.")
        }
        1 => format!(
            "{name} likes {} and {}.",
            pick(rng, EN_FOODS),
            pick(rng, EN_FOODS)
        ),
        2 => {
            let w = pick(rng, EN_WORDS);
            format!("The word {w} in capitals is {}.", w.to_uppercase())
        }
        3 => {
            let (a, b) = (rng.random_range(0..50), rng.random_range(0..50));
            format!("{a} plus {b} is {}.", a + b)
        }
        _ => format!(
            "{name} went to {} with {}.",
            pick(rng, EN_CITIES),
            pick(rng, EN_NAMES)
        ),
    }
}

/// A line of `k` sentences joined as one paragraph.
fn paragraph(rng: &mut ChaCha8Rng, k: usize, zh: bool) -> String {
    let sep = if zh { "" } else { " " };
    (0..k)
        .map(|_| {
            if zh {
                zh_sentence(rng)
            } else {
                en_sentence(rng)
            }
        })
        .collect::<Vec<_>>()
        .join(sep)
}

/// One instruction task instance; `key` identifies its arguments so held-out instances are unseen.
fn task(rng: &mut ChaCha8Rng) -> (String, Record) {
    match rng.random_range(0..4) {
        0 => {
            let (y, m, d) = (
                rng.random_range(1990..2030),
                rng.random_range(1..13),
                rng.random_range(1..29),
            );
            let rec = Record {
                instruction: "把下面的日期转换成 YYYY-MM-DD 格式。".into(),
                input: format!("{y}年{m}月{d}日"),
                output: format!("{y}-{m:02}-{d:02}"),
            };
            (format!("date:{y}:{m}:{d}"), rec)
        }
        1 => {
            let name = pick(rng, ZH_NAMES);
            let city = pick(rng, ZH_CITIES);
            let food = pick(rng, ZH_FOODS);
            let rec = Record {
                instruction: "找出句子中的城市名。".into(),
                input: format!("{name}在{city}吃了{food}。"),
                output: city.to_string(),
            };
            (format!("city:{name}:{city}:{food}"), rec)
        }
        2 => {
            let n = rng.random_range(0..10000);
            let rec = Record {
                instruction: "把这个中文数字写成阿拉伯数字。".into(),
                input: zh_number(n),
                output: n.to_string(),
            };
            (format!("num:{n}"), rec)
        }
        _ => {
            let a = pick(rng, ZH_FOODS);
            let mut b = pick(rng, ZH_FOODS);
            while b == a {
                b = pick(rng, ZH_FOODS);
            }
            let rec = Record {
                instruction: "交换这两个词的顺序，用空格分开。".into(),
                input: format!("{a} {b}"),
                output: format!("{b} {a}"),
            };
            (format!("swap:{a}:{b}"), rec)
        }
    }
}

/// Generate the demo's data from `seed`. `scale` multiplies every count (1.0 = full demo).
pub fn generate(seed: u64, scale: f64) -> DemoData {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = |x: usize| ((x as f64 * scale).round() as usize).max(8);
    let mut base_corpus: Vec<String> = (0..n(1500))
        .map(|_| paragraph(&mut rng, 4, false))
        .collect();
    // The English of the Alpaca prompt, as LLaMA knew it (a corpus line holds no newline).
    base_corpus.extend((0..n(150)).map(|_| {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request. ### Instruction: {} ### Response: {}",
            en_sentence(&mut rng),
            en_sentence(&mut rng)
        )
    }));
    // A little Chinese in the base corpus, as LLaMA saw a little: its vocab covers few Chinese pieces.
    base_corpus.extend((0..n(60)).map(|_| paragraph(&mut rng, 2, true)));
    let zh_corpus: Vec<String> = (0..n(1500)).map(|_| paragraph(&mut rng, 4, true)).collect();
    let zh_heldout: Vec<String> = (0..n(100)).map(|_| paragraph(&mut rng, 4, true)).collect();

    let mut seen = HashSet::new();
    let mut sft_train = Vec::new();
    while sft_train.len() < n(1200) {
        let (key, rec) = task(&mut rng);
        if seen.insert(key) {
            sft_train.push(rec);
        }
    }
    let mut sft_heldout = Vec::new();
    while sft_heldout.len() < n(100) {
        let (key, rec) = task(&mut rng);
        if seen.insert(key) {
            sft_heldout.push(rec);
        }
    }
    DemoData {
        base_corpus,
        zh_corpus,
        zh_heldout,
        sft_train,
        sft_heldout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zh_numbers_read_as_written() {
        // Independent expectations: how these numbers are written in everyday Chinese.
        let cases = [
            (0, "零"),
            (7, "七"),
            (10, "十"),
            (15, "十五"),
            (20, "二十"),
            (105, "一百零五"),
            (110, "一百一十"),
            (1001, "一千零一"),
            (1010, "一千零一十"),
            (2300, "二千三百"),
            (9999, "九千九百九十九"),
        ];
        for (n, want) in cases {
            assert_eq!(zh_number(n), want, "zh_number({n})");
        }
    }

    #[test]
    fn same_seed_same_data_and_heldout_is_unseen() {
        let a = generate(7, 0.2);
        let b = generate(7, 0.2);
        assert_eq!(a.zh_corpus, b.zh_corpus);
        assert_eq!(a.sft_train, b.sft_train);
        let train: HashSet<_> = a
            .sft_train
            .iter()
            .map(|r| (&r.instruction, &r.input))
            .collect();
        for r in &a.sft_heldout {
            assert!(
                !train.contains(&(&r.instruction, &r.input)),
                "held-out record seen in training: {r:?}"
            );
        }
        let c = generate(8, 0.2);
        assert_ne!(a.zh_corpus, c.zh_corpus);
    }
}
