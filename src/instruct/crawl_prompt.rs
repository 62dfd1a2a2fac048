//! The self-instruct request prompt (docs/RECIPE.md §5): a replaceable template with `{{name}}`
//! placeholders, filled per request with topics, task types and length bounds drawn at random.

use anyhow::{Result, bail};
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The default template (a file users can copy and change, then pass with `--prompt-template`).
pub const DEFAULT_TEMPLATE: &str = include_str!("../../tools/crawl/prompt_template.txt");

/// Everyday and professional domains; 10 are drawn per request.
pub const TOPICS: &[&str] = &[
    "日常生活",
    "烹饪与美食",
    "旅行",
    "健康与养生",
    "体育运动",
    "健身",
    "医学",
    "心理学",
    "教育",
    "育儿",
    "家庭关系",
    "人际交往",
    "职场",
    "求职与面试",
    "企业管理",
    "市场营销",
    "金融",
    "投资理财",
    "会计与税务",
    "经济学",
    "法律",
    "政治与公共政策",
    "历史",
    "地理",
    "天文",
    "物理",
    "化学",
    "生物",
    "数学",
    "统计学",
    "计算机科学",
    "软件开发",
    "人工智能",
    "网络安全",
    "数据库",
    "电子工程",
    "机械工程",
    "土木与建筑",
    "汽车",
    "航空航天",
    "能源",
    "环境保护",
    "农业",
    "园艺",
    "宠物",
    "野生动物",
    "植物",
    "气象",
    "海洋",
    "哲学",
    "宗教与民俗",
    "文学",
    "古诗词",
    "小说创作",
    "语言学",
    "外语学习",
    "新闻传媒",
    "广告文案",
    "电影",
    "音乐",
    "绘画与艺术",
    "摄影",
    "平面设计",
    "时尚穿搭",
    "电子游戏",
    "动漫",
    "社交媒体",
    "电子商务",
    "物流与供应链",
    "房地产",
    "家居装修",
    "消费电子",
    "节日习俗",
    "传统文化",
    "城市生活",
    "公共服务",
    "交通出行",
    "考古",
    "科幻",
    "伦理",
    "创业",
    "志愿服务与公益",
];

/// The recipe's 14 task types; 10 are drawn per request.
pub const TASK_TYPES: &[&str] = &[
    "开放式生成",
    "分类",
    "问答",
    "编辑（改写、纠错、润色）",
    "摘要",
    "写作",
    "翻译",
    "编程",
    "分析",
    "代码解释",
    "常识推理",
    "写信",
    "信息抽取",
    "推荐",
];

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "n_items",
    "topics",
    "task_types",
    "input_max_chars",
    "output_max_chars",
    "language",
];

/// How each request's prompt is drawn.
#[derive(Clone, Debug)]
pub struct PromptSpec {
    pub n_items: usize,
    pub n_topics: usize,
    pub n_task_types: usize,
    /// Inclusive range the per-request input bound is drawn from (recipe: 80–120 characters).
    pub input_max_chars: (usize, usize),
    /// Inclusive range the per-request output bound is drawn from (recipe: 128–512 characters).
    pub output_max_chars: (usize, usize),
    pub language: String,
}

impl Default for PromptSpec {
    fn default() -> Self {
        PromptSpec {
            n_items: 20,
            n_topics: 10,
            n_task_types: 10,
            input_max_chars: (80, 120),
            output_max_chars: (128, 512),
            language: "中文".into(),
        }
    }
}

/// A checked template: every `{{name}}` in it is a known placeholder.
#[derive(Clone, Debug)]
pub struct Template {
    text: String,
}

impl Template {
    /// Check `text` (read from `origin`, named in errors) for unknown or unclosed placeholders.
    pub fn parse(text: &str, origin: &str) -> Result<Template> {
        let mut rest = text;
        let mut line = 1;
        while let Some(i) = rest.find("{{") {
            line += rest[..i].matches('\n').count();
            let after = &rest[i + 2..];
            let Some(j) = after.find("}}") else {
                bail!("{origin}:{line}: unclosed placeholder '{{{{'");
            };
            let name = after[..j].trim();
            if !PLACEHOLDERS.contains(&name) {
                bail!(
                    "{origin}:{line}: unknown placeholder {{{{{name}}}}} (known: {})",
                    PLACEHOLDERS.join(", ")
                );
            }
            line += after[..j].matches('\n').count();
            rest = &after[j + 2..];
        }
        Ok(Template { text: text.into() })
    }

    /// The built-in template.
    pub fn default_template() -> Template {
        Template::parse(DEFAULT_TEMPLATE, "built-in template").expect("built-in template is valid")
    }

    /// Fill the placeholders with `vars`.
    pub fn render(&self, vars: &PromptVars) -> String {
        let mut out = String::with_capacity(self.text.len() + 256);
        let mut rest = self.text.as_str();
        while let Some(i) = rest.find("{{") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let j = after.find("}}").expect("checked by parse");
            match after[..j].trim() {
                "n_items" => out.push_str(&vars.n_items.to_string()),
                "topics" => out.push_str(&vars.topics.join("、")),
                "task_types" => out.push_str(&vars.task_types.join("、")),
                "input_max_chars" => out.push_str(&vars.input_max_chars.to_string()),
                "output_max_chars" => out.push_str(&vars.output_max_chars.to_string()),
                "language" => out.push_str(&vars.language),
                other => unreachable!("placeholder {other} passed parse"),
            }
            rest = &after[j + 2..];
        }
        out.push_str(rest);
        out
    }
}

/// The values drawn for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptVars {
    pub n_items: usize,
    pub topics: Vec<String>,
    pub task_types: Vec<String>,
    pub input_max_chars: usize,
    pub output_max_chars: usize,
    pub language: String,
}

/// The RNG for request number `req` of a crawl seeded with `seed`: prompts depend only on these
/// two, so a resumed crawl asks the same questions an uninterrupted one would.
pub fn request_rng(seed: u64, req: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (req.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Draw one request's values: topics and task types without replacement, bounds uniformly.
pub fn sample_vars(
    rng: &mut impl Rng,
    topics: &[String],
    task_types: &[String],
    spec: &PromptSpec,
) -> PromptVars {
    let pick = |rng: &mut _, from: &[String], n: usize| -> Vec<String> {
        let mut v = from.to_vec();
        v.shuffle(rng);
        v.truncate(n.min(from.len()));
        v
    };
    let topics = pick(rng, topics, spec.n_topics);
    let task_types = pick(rng, task_types, spec.n_task_types);
    PromptVars {
        n_items: spec.n_items,
        topics,
        task_types,
        input_max_chars: rng.random_range(spec.input_max_chars.0..=spec.input_max_chars.1),
        output_max_chars: rng.random_range(spec.output_max_chars.0..=spec.output_max_chars.1),
        language: spec.language.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn strings(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lists_are_as_the_recipe_says() {
        assert_eq!(TASK_TYPES.len(), 14);
        assert!((75..=90).contains(&TOPICS.len()), "{}", TOPICS.len());
        let distinct: HashSet<_> = TOPICS.iter().collect();
        assert_eq!(distinct.len(), TOPICS.len(), "duplicate topic");
    }

    #[test]
    fn default_template_renders_every_value() {
        let t = Template::default_template();
        let spec = PromptSpec::default();
        let mut rng = request_rng(1, 0);
        let v = sample_vars(&mut rng, &strings(TOPICS), &strings(TASK_TYPES), &spec);
        assert_eq!(v.topics.len(), 10);
        assert_eq!(v.task_types.len(), 10);
        assert_eq!(v.topics.iter().collect::<HashSet<_>>().len(), 10);
        assert!((80..=120).contains(&v.input_max_chars));
        assert!((128..=512).contains(&v.output_max_chars));
        let p = t.render(&v);
        assert!(!p.contains("{{"), "{p}");
        for s in v.topics.iter().chain(&v.task_types) {
            assert!(p.contains(s.as_str()), "missing {s}");
        }
        assert!(p.contains("20条"));
        assert!(p.contains(&format!("{}个字", v.input_max_chars)));
        assert!(p.contains(&format!("少于{}个字", v.output_max_chars)));
    }

    #[test]
    fn prompts_depend_only_on_seed_and_request() {
        let spec = PromptSpec::default();
        let (tp, tt) = (strings(TOPICS), strings(TASK_TYPES));
        let a = sample_vars(&mut request_rng(5, 3), &tp, &tt, &spec);
        let b = sample_vars(&mut request_rng(5, 3), &tp, &tt, &spec);
        let c = sample_vars(&mut request_rng(5, 4), &tp, &tt, &spec);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn template_errors_name_the_file_and_line() {
        let e = Template::parse("a\nb {{topics}}\n{{nope}}", "t.txt").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.txt:3: unknown placeholder {{nope}}"),
            "{e}"
        );
        let e = Template::parse("x {{topics", "t.txt").unwrap_err();
        assert!(e.to_string().contains("t.txt:1: unclosed"), "{e}");
        let t = Template::parse("{{ n_items }} 条，{{language}}", "t.txt").unwrap();
        let v = PromptVars {
            n_items: 7,
            topics: vec![],
            task_types: vec![],
            input_max_chars: 1,
            output_max_chars: 2,
            language: "English".into(),
        };
        assert_eq!(t.render(&v), "7 条，English");
    }
}
