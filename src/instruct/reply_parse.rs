//! Robust parsing of a chat model's reply into `{instruction, input, output}` items.
//!
//! Models asked for "a JSON array" answer with code fences, a sentence before and after, numbered
//! lists of objects, trailing commas, raw newlines inside strings, a wrapper object, or a reply cut
//! off mid-item. The parser does not trust the outer shape: it scans the text for balanced `{…}`
//! objects (string- and escape-aware), parses each (repairing the common faults when plain
//! parsing fails), and walks the result for objects that carry an instruction. An object that fails
//! is rescanned from inside, so a broken wrapper still yields the complete items it holds.
//! Every object that could not become an item is counted by reason; nothing here is fatal.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One instruction record in the Alpaca layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// Why a candidate object did not become an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invalid {
    /// A balanced `{…}` that is not JSON even after repair.
    Malformed,
    /// An object still open when the reply ended (e.g. `finish_reason = "length"`).
    Truncated,
    /// An object with an instruction but no output (or an empty-keyed one).
    MissingField,
    /// A field holding an object or array where text was expected.
    BadFieldType,
    /// A reply with no object in it at all.
    NoItems,
}

impl Invalid {
    /// Stable short name, used in counters and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed_json",
            Invalid::Truncated => "truncated_item",
            Invalid::MissingField => "missing_field",
            Invalid::BadFieldType => "bad_field_type",
            Invalid::NoItems => "no_items",
        }
    }
}

/// Items found in one reply, in reply order, and the objects rejected on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub items: Vec<Item>,
    pub invalid: Vec<Invalid>,
}

/// Parse one reply (see the module doc).
pub fn parse_reply(text: &str) -> Parsed {
    let mut out = Parsed::default();
    scan(text, &mut out, 0);
    if out.items.is_empty() && out.invalid.is_empty() {
        out.invalid.push(Invalid::NoItems);
    }
    out
}

/// End (exclusive byte offset) of the balanced object starting at `start` (a `{`), or None when
/// the text ends first.
fn balanced_end(text: &str, start: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut esc = false;
    for (i, &c) in b.iter().enumerate().skip(start) {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

fn scan(text: &str, out: &mut Parsed, depth: usize) {
    let mut pos = 0;
    while let Some(off) = text[pos..].find('{') {
        let start = pos + off;
        match balanced_end(text, start) {
            Some(end) => {
                let obj = &text[start..end];
                match parse_lenient(obj) {
                    // A JSON object with nothing instruction-like in it (e.g. `{"n": 20}`) is
                    // stray text, not a broken item: `walk` adds nothing for it.
                    Some(v) => walk(&v, out),
                    None => rescan_or(&text[start + 1..end - 1], Invalid::Malformed, out, depth),
                }
                pos = end;
            }
            None => {
                rescan_or(&text[start + 1..], Invalid::Truncated, out, depth);
                return;
            }
        }
    }
}

const MAX_RESCAN_DEPTH: usize = 4;

/// Scan the inside of a failed object; if it yields nothing, count the failure itself.
fn rescan_or(inner: &str, reason: Invalid, out: &mut Parsed, depth: usize) {
    // Items sit at most a wrapper or two deep; the bound keeps hostile input (thousands of
    // unmatched braces) linear and off the stack's limit.
    if depth >= MAX_RESCAN_DEPTH {
        out.invalid.push(reason);
        return;
    }
    let mut sub = Parsed::default();
    scan(inner, &mut sub, depth + 1);
    if sub.items.is_empty() {
        out.invalid.push(reason);
    } else {
        out.items.extend(sub.items);
        out.invalid.extend(sub.invalid);
    }
}

/// serde_json first; on failure, once more after [`repair`].
fn parse_lenient(obj: &str) -> Option<Value> {
    serde_json::from_str(obj)
        .ok()
        .or_else(|| serde_json::from_str(&repair(obj)).ok())
}

/// Fix what models commonly get wrong in JSON: raw control characters inside strings (escaped),
/// backslashes before characters JSON cannot escape (doubled), and trailing commas before `}`/`]`
/// (dropped).
pub fn repair(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let mut in_str = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '"' => {
                    in_str = false;
                    out.push(c);
                }
                '\\' => match chars.peek() {
                    Some('"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' | 'u') => {
                        out.push(c);
                        out.push(chars.next().unwrap());
                    }
                    _ => out.push_str("\\\\"),
                },
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {}
                c => out.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push(c);
            }
            ',' => {
                // Drop the comma if only whitespace stands between it and a closing bracket.
                let rest: String = chars.clone().take_while(|c| c.is_whitespace()).collect();
                let after = chars.clone().nth(rest.chars().count());
                if !matches!(after, Some('}' | ']')) {
                    out.push(c);
                }
            }
            c => out.push(c),
        }
    }
    out
}

const INSTRUCTION_KEYS: &[&str] = &["instruction", "指令", "instructions"];
const INPUT_KEYS: &[&str] = &["input", "输入"];
const OUTPUT_KEYS: &[&str] = &["output", "输出", "response", "answer", "回答"];
/// `input` values that mean "no input" (the self-instruct `<noinput>` convention and its kin).
const NO_INPUT: &[&str] = &[
    "<noinput>",
    "<无输入>",
    "无输入",
    "<无>",
    "无",
    "空",
    "n/a",
    "none",
    "null",
];

fn field<'a>(obj: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| {
            let k = k.trim().to_lowercase();
            keys.contains(&k.as_str())
        })
        .map(|(_, v)| v)
}

/// Text of a field: strings trimmed, numbers and booleans printed, null empty; containers are an error.
fn text_of(v: &Value) -> Result<String, Invalid> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        Value::Array(_) | Value::Object(_) => Err(Invalid::BadFieldType),
    }
}

fn walk(v: &Value, out: &mut Parsed) {
    match v {
        Value::Object(obj) => match field(obj, INSTRUCTION_KEYS) {
            Some(ins) => match item_of(obj, ins) {
                Ok(item) => out.items.push(item),
                Err(e) => out.invalid.push(e),
            },
            None => obj.values().for_each(|x| walk(x, out)),
        },
        Value::Array(xs) => xs.iter().for_each(|x| walk(x, out)),
        _ => {}
    }
}

fn item_of(obj: &serde_json::Map<String, Value>, ins: &Value) -> Result<Item, Invalid> {
    let instruction = text_of(ins)?;
    let input = match field(obj, INPUT_KEYS) {
        Some(v) => text_of(v)?,
        None => String::new(),
    };
    let input = if NO_INPUT.contains(&input.to_lowercase().as_str()) {
        String::new()
    } else {
        input
    };
    let output = text_of(field(obj, OUTPUT_KEYS).ok_or(Invalid::MissingField)?)?;
    Ok(Item {
        instruction,
        input,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(i: &str, inp: &str, o: &str) -> Item {
        Item {
            instruction: i.into(),
            input: inp.into(),
            output: o.into(),
        }
    }

    /// One data-driven check: the items and invalid reasons expected from a reply.
    fn check(reply: &str, items: &[Item], invalid: &[Invalid]) {
        let got = parse_reply(reply);
        assert_eq!(got.items, items, "items of {reply:?}");
        assert_eq!(got.invalid, invalid, "invalid of {reply:?}");
    }

    #[test]
    fn shapes() {
        let a = it("写一首诗", "", "床前明月光");
        let b = it("翻译", "你好", "Hello");
        // A plain array.
        check(
            r#"[{"instruction":"写一首诗","input":"","output":"床前明月光"},{"instruction":"翻译","input":"你好","output":"Hello"}]"#,
            &[a.clone(), b.clone()],
            &[],
        );
        // Code fence and prose around it.
        check(
            "好的，以下是任务：\n```json\n[\n {\"instruction\": \"写一首诗\", \"input\": \"<无输入>\", \"output\": \"床前明月光\"}\n]\n```\n希望有帮助！",
            std::slice::from_ref(&a),
            &[],
        );
        // A numbered list of objects.
        check(
            "1. {\"instruction\": \"写一首诗\", \"output\": \"床前明月光\"}\n2. {\"instruction\": \"翻译\", \"input\": \"你好\", \"output\": \"Hello\"}",
            &[a.clone(), b.clone()],
            &[],
        );
        // Trailing commas and a raw newline inside a string.
        check(
            "[{\"instruction\":\"写一首诗\",\"input\":\"\",\"output\":\"床前\n明月光\",},]",
            &[it("写一首诗", "", "床前\n明月光")],
            &[],
        );
        // Truncated final item: the complete ones are kept.
        check(
            r#"[{"instruction":"写一首诗","input":"","output":"床前明月光"},{"instruction":"翻译","input":"你好","output":"Hel"#,
            std::slice::from_ref(&a),
            &[Invalid::Truncated],
        );
        // A wrapper object, itself truncated.
        check(
            r#"{"tasks": [{"instruction":"写一首诗","output":"床前明月光"}, {"instruction":"翻"#,
            std::slice::from_ref(&a),
            &[Invalid::Truncated],
        );
        // Chinese keys, numeric output.
        check(
            r#"{"指令":"计算1+1","输入":"","输出":2}"#,
            &[it("计算1+1", "", "2")],
            &[],
        );
        // Braces and quotes inside strings do not confuse the scanner.
        check(
            r#"[{"instruction":"解释代码","input":"fn main() { println!(\"}\"); }","output":"打印 }"}]"#,
            &[it("解释代码", "fn main() { println!(\"}\"); }", "打印 }")],
            &[],
        );
        // Invalid escapes (LaTeX backslashes) are repaired. (`\beta` or `\frac` are valid JSON
        // escapes, backspace and form feed, and are left as JSON defines them.)
        check(
            r#"[{"instruction":"写出公式","input":"","output":"\alpha + \gamma"}]"#,
            &[it("写出公式", "", "\\alpha + \\gamma")],
            &[],
        );
    }

    #[test]
    fn invalid_items_are_counted() {
        check("抱歉，我无法完成。", &[], &[Invalid::NoItems]);
        check(
            r#"[{"instruction":"a","input":""}, {"instruction":"b","output":["x","y"]}, {"instruction":"c","output":"d"}]"#,
            &[it("c", "", "d")],
            &[Invalid::MissingField, Invalid::BadFieldType],
        );
        check(
            r#"{"instruction": "a" "output": "b"} {"instruction":"c","output":"d"}"#,
            &[it("c", "", "d")],
            &[Invalid::Malformed],
        );
        // Stray JSON without instructions is ignored, not counted.
        check(
            r#"{"count": 20} [{"instruction":"c","output":"d"}]"#,
            &[it("c", "", "d")],
            &[],
        );
    }

    #[test]
    fn hostile_input_stays_linear() {
        let braces = "{".repeat(200_000);
        let got = parse_reply(&braces);
        assert!(got.items.is_empty());
        assert_eq!(got.invalid, vec![Invalid::Truncated]);
        let text = format!(
            "{}{}",
            r#"[{"instruction":"a","output":"b"}]"#,
            "{\"x\": [".repeat(50_000)
        );
        assert_eq!(parse_reply(&text).items, vec![it("a", "", "b")]);
    }

    #[test]
    fn repair_cases() {
        assert_eq!(repair(r#"{"a": [1, 2, ], }"#), r#"{"a": [1, 2 ] }"#);
        assert_eq!(repair("{\"a\": \"x\ty\"}"), r#"{"a": "x\ty"}"#);
        assert_eq!(repair(r#"{"a": "\d"}"#), r#"{"a": "\\d"}"#);
        // Commas inside strings stay.
        assert_eq!(repair(r#"{"a": "1, ]"}"#), r#"{"a": "1, ]"}"#);
    }
}
