//! The "Architecture invariant:" lines of ARCHITECTURE.md that can be read off the source text,
//! checked on `src/` and `tools/` as plain text: comments, string and character literals and
//! `#[cfg(test)]` modules are blanked first, then `use` trees and `crate::`/`super::`/`self::`
//! paths are resolved to the files that define what they name (following `pub use` re-exports).
//!
//! Limits of the reading: a path through a glob re-export or a macro is credited to the module it
//! names, and a file's references to its own ancestors' items are not edges (a child module using
//! its parent is how Rust modules are built, and the parent's `mod` lines are not imports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of the library, lowest first. A module may import only from lower layers; modules of
/// one layer import nothing of each other (`model` and `distributed`: neither knows the other).
/// The binaries (`src/main.rs`, `src/cli/`, `tools/*.rs`) sit above every layer.
const LEVELS: &[&[&str]] = &[
    &["util", "tensor"],
    &["vocab", "instruct"],
    &["data"],
    &["ops"],
    &["backend"],
    &["model", "distributed"],
    &["train"],
    &["export", "demo"],
];

/// No source file in `src/` or `tools/` is longer.
const MAX_LINES: usize = 1200;

/// Where `cfg(feature = ...)` may appear: the stub pattern keeps every other module free of it.
const CFG_FEATURE_DIRS: &[&str] = &["src/backend/", "src/distributed/"];

/// Library files that may read the environment or the arguments, and why. Empty: the binaries
/// (`src/main.rs`, `src/cli/`, `tools/`) parse both and pass values down.
const ENV_EXCEPTIONS: &[(&str, &str)] = &[];

/// Library files that may open a file for writing other than through the helpers in `src/util/`
/// (`write_atomic`, `replace_dir`, the run lock), and why.
const WRITE_EXCEPTIONS: &[(&str, &str)] = &[
    (
        "src/vocab/merge.rs",
        "writes the merged model's files into a temp directory that is renamed into place",
    ),
    (
        "src/export/mod.rs",
        "streams the GGUF file (larger than memory) into a temp file that is renamed into place",
    ),
    (
        "src/data/shard.rs",
        "streams token shards into temp files that are renamed into place",
    ),
    (
        "src/instruct/crawl.rs",
        "the crawler's output is an append-only JSONL log (a torn last line is cut on open)",
    ),
    (
        "src/train/tensorboard.rs",
        "TensorBoard event files are append-only logs; every run (and resume) opens a new file",
    ),
    (
        "src/train/metrics.rs",
        "metrics.jsonl is rewritten atomically when a run starts or resumes, then appended to",
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (relative to the package root), sorted.
fn files_under(dir: &str) -> Vec<String> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    let mut v: Vec<String> = out
        .iter()
        .map(|p| {
            p.strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    v.sort();
    v
}

fn rust_files() -> Vec<String> {
    files_under("src")
        .into_iter()
        .filter(|f| f.ends_with(".rs"))
        .collect()
}

/// Library files that may still silence `clippy::too_many_arguments`, and why (each entry must
/// still need it: the test fails once the file has no such allow).
const ARGUMENT_ALLOW_EXCEPTIONS: &[(&str, &str)] = &[(
    "src/distributed/zero_device.rs",
    "`DeviceZero2::step` takes `Zero2::step`'s arguments plus the backend and the poison value",
)];

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `src` with comments, string and char literals replaced by spaces (newlines kept, so byte
/// offsets and line numbers stay), then every `#[cfg(test)]` item blanked the same way.
fn code_of(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if (rest.starts_with(b"r#") || rest.starts_with(b"r\"") || rest.starts_with(b"br"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && raw_string_hashes(rest).is_some()
        {
            let (start, hashes) = raw_string_hashes(rest).unwrap();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body = i + start;
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, (j + 1).min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"') or a lifetime ('a): only the former ends
            // with a quote within a few bytes.
            let end = if rest.get(1) == Some(&b'\\') {
                rest.iter()
                    .skip(2)
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p + 1)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(6)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(5)]).ok())
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(4)]).ok())
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(3)]).ok())
                    .and_then(|s| s.chars().next());
                ch.and_then(|c| {
                    let l = c.len_utf8();
                    (rest.get(1 + l) == Some(&b'\'')).then_some(i + 2 + l)
                })
            };
            match end {
                Some(e) => {
                    blank(&mut out, i, e);
                    i = e;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    let mut code = String::from_utf8(out).expect("blanking keeps UTF-8 (only ASCII changed)");
    // `#[cfg(test)]` items: from the attribute to the end of the item's braces (or `;`).
    while let Some(at) = code.find("#[cfg(test)]") {
        let cb = code.as_bytes();
        let mut j = at + "#[cfg(test)]".len();
        while j < cb.len() && cb[j] != b'{' && cb[j] != b';' {
            j += 1;
        }
        if j < cb.len() && cb[j] == b'{' {
            let mut depth = 0usize;
            while j < cb.len() {
                match cb[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        let end = (j + 1).min(cb.len());
        let blanked: String = code[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        code.replace_range(at..end, &blanked);
    }
    code
}

/// `(offset of the body, number of #)` when `s` starts a raw (byte) string literal.
fn raw_string_hashes(s: &[u8]) -> Option<(usize, usize)> {
    let mut j = if s.starts_with(b"br") { 2 } else { 1 };
    let mut hashes = 0;
    while s.get(j) == Some(&b'#') {
        hashes += 1;
        j += 1;
    }
    (s.get(j) == Some(&b'"')).then_some((j + 1, hashes))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The module path of a source file: `src/a/b.rs` and `src/a/b/mod.rs` → `[a, b]`;
/// `src/lib.rs`, `src/main.rs` → `[]`.
fn module_of(file: &str) -> Vec<String> {
    let rel = file
        .strip_prefix("src/")
        .unwrap()
        .strip_suffix(".rs")
        .unwrap();
    let mut segs: Vec<String> = rel.split('/').map(str::to_string).collect();
    if matches!(
        segs.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        segs.pop();
    }
    segs
}

/// One path a file refers to: its segments and the byte offset in the file.
struct PathRef {
    segs: Vec<String>,
    offset: usize,
    /// A `pub use`: the last segment (or its alias) becomes a name of the file's module.
    reexport_as: Option<String>,
}

/// Expand a `use` tree (`a::{b, c::d as e, f::*}`) into full paths and their binding names.
fn expand_use(tree: &str, prefix: &[String], out: &mut Vec<(Vec<String>, String)>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    // Split at the first top-level `{`.
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let mut p = prefix.to_vec();
        p.extend(
            head.split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
        let close = tree.rfind('}').expect("balanced use tree");
        let inner = &tree[open + 1..close];
        let (mut depth, mut start) = (0usize, 0usize);
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&inner[start..k], &p, out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand_use(&inner[start..], &p, out);
        return;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((p, a)) => (p.trim(), Some(a.trim().to_string())),
        None => (tree, None),
    };
    let mut p = prefix.to_vec();
    p.extend(path.split("::").map(|s| s.trim().to_string()));
    if p.last().map(String::as_str) == Some("self") {
        p.pop();
    }
    let name = alias.unwrap_or_else(|| p.last().cloned().unwrap_or_default());
    out.push((p, name));
}

/// Every path `code` refers to: `use` trees, and `crate::`/`super::`/`self::`/`zhllama::` paths
/// elsewhere.
fn paths_of(code: &str) -> Vec<PathRef> {
    let mut refs = Vec::new();
    let mut use_spans = Vec::new();
    let bytes = code.as_bytes();
    let mut search = 0;
    while let Some(k) = code[search..].find("use ") {
        let at = search + k;
        search = at + 4;
        if at > 0 && is_ident(bytes[at - 1] as char) {
            continue;
        }
        let Some(end) = code[at..].find(';').map(|e| at + e) else {
            break;
        };
        let before = code[..at].trim_end();
        let public = before.ends_with("pub") || before.ends_with(')') && before.contains("pub(");
        let mut expanded = Vec::new();
        expand_use(&code[at + 4..end], &[], &mut expanded);
        for (segs, name) in expanded {
            refs.push(PathRef {
                segs,
                offset: at,
                reexport_as: public.then_some(name),
            });
        }
        use_spans.push(at..end);
        search = end;
    }
    for root in ["crate::", "super::", "self::", "zhllama::"] {
        let mut search = 0;
        while let Some(k) = code[search..].find(root) {
            let at = search + k;
            search = at + root.len();
            if at > 0 && (is_ident(bytes[at - 1] as char) || bytes[at - 1] == b':') {
                continue;
            }
            if use_spans.iter().any(|s| s.contains(&at)) {
                continue;
            }
            let mut end = at;
            loop {
                let seg_end = code[end..]
                    .find(|c: char| !is_ident(c))
                    .map_or(code.len(), |e| end + e);
                if code[seg_end..].starts_with("::")
                    && code[seg_end + 2..].starts_with(|c: char| is_ident(c))
                {
                    end = seg_end + 2;
                } else {
                    end = seg_end;
                    break;
                }
            }
            refs.push(PathRef {
                segs: code[at..end].split("::").map(str::to_string).collect(),
                offset: at,
                reexport_as: None,
            });
        }
    }
    refs
}

/// The parsed source tree: files, their modules, their references and their re-exports.
struct Tree {
    files: Vec<String>,
    code: BTreeMap<String, String>,
    file_of_module: BTreeMap<Vec<String>, String>,
    refs: BTreeMap<String, Vec<PathRef>>,
    /// `(module, name)` → the use path a `pub use` binds to that name.
    reexports: BTreeMap<(Vec<String>, String), (String, Vec<String>)>,
}

impl Tree {
    fn load() -> Tree {
        let files = rust_files();
        let mut t = Tree {
            files: files.clone(),
            code: BTreeMap::new(),
            file_of_module: BTreeMap::new(),
            refs: BTreeMap::new(),
            reexports: BTreeMap::new(),
        };
        for f in &files {
            if f != "src/main.rs" {
                t.file_of_module.insert(module_of(f), f.clone());
            }
            let code = code_of(&read(f));
            let refs = paths_of(&code);
            for r in &refs {
                if let Some(name) = &r.reexport_as {
                    t.reexports
                        .insert((module_of(f), name.clone()), (f.clone(), r.segs.clone()));
                }
            }
            t.refs.insert(f.clone(), refs);
            t.code.insert(f.clone(), code);
        }
        t
    }

    /// The module (path) whose file defines what `segs`, written in `file`, names (through `pub
    /// use` re-exports when `follow`, else the last module the path spells out); `None` for paths
    /// outside the crate (std, other crates, local items).
    fn resolve(
        &self,
        file: &str,
        segs: &[String],
        follow: bool,
        depth: usize,
    ) -> Option<Vec<String>> {
        let here = module_of(file);
        let first = segs.first()?.as_str();
        let (mut cur, rest) = match first {
            "crate" | "zhllama" => (vec![], &segs[1..]),
            "self" => (here.clone(), &segs[1..]),
            "super" => {
                let mut m = here.clone();
                let mut k = 0;
                while segs.get(k).map(String::as_str) == Some("super") {
                    m.pop();
                    k += 1;
                }
                (m, &segs[k..])
            }
            _ => {
                let mut child = here.clone();
                child.push(first.to_string());
                if self.file_of_module.contains_key(&child) {
                    (here.clone(), segs)
                } else {
                    return None;
                }
            }
        };
        for s in rest {
            let mut next = cur.clone();
            next.push(s.clone());
            if self.file_of_module.contains_key(&next) {
                cur = next;
                continue;
            }
            if follow
                && depth < 8
                && let Some((from, path)) = self.reexports.get(&(cur.clone(), s.clone()))
                && let Some(m) = self.resolve(from, path, true, depth + 1)
            {
                return Some(m);
            }
            break;
        }
        Some(cur)
    }

    /// `(from file, to file, line)` for every reference to another file that is not an ancestor:
    /// both the module a path spells out (`crate::model::lora::mix64` depends on `model::lora`
    /// even when that only re-exports it) and the file that defines the item.
    fn edges(&self) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for f in &self.files {
            let here = module_of(f);
            for r in &self.refs[f] {
                let written = self.resolve(f, &r.segs, false, 0);
                let defined = self.resolve(f, &r.segs, true, 0);
                for m in [written, defined].into_iter().flatten() {
                    if here.starts_with(&m) {
                        continue; // the file itself or an ancestor
                    }
                    let Some(to) = self.file_of_module.get(&m) else {
                        continue;
                    };
                    let e = (f.clone(), to.clone(), line_of(&self.code[f], r.offset));
                    if !out.contains(&e) {
                        out.push(e);
                    }
                }
            }
        }
        out
    }
}

/// The top-level module a file belongs to (`None`: lib.rs, main.rs).
fn top_of(file: &str) -> Option<String> {
    module_of(file).first().cloned()
}

fn level_of(top: &str) -> Option<usize> {
    LEVELS.iter().position(|l| l.contains(&top))
}

fn is_binary(file: &str) -> bool {
    file == "src/main.rs" || file.starts_with("src/cli/")
}

/// Upward imports (and imports between modules of one layer), as messages.
fn upward_imports(tree: &Tree) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, to, line) in tree.edges() {
        if is_binary(&from) {
            continue;
        }
        let (Some(a), Some(b)) = (top_of(&from), top_of(&to)) else {
            continue;
        };
        if a == b {
            continue;
        }
        let la = level_of(&a).unwrap_or_else(|| panic!("{from}: module {a} is in no layer"));
        let lb = level_of(&b).unwrap_or_else(|| panic!("{to}: module {b} is in no layer"));
        if lb >= la {
            bad.push(format!(
                "{from}:{line}: {a} (layer {la}) imports {to} ({b}, layer {lb})"
            ));
        }
    }
    bad
}

/// Circles among the files (strongly connected components of more than one file).
fn circles(tree: &Tree) -> Vec<Vec<String>> {
    let mut adj: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let edges = tree.edges();
    for (a, b, _) in &edges {
        adj.entry(a.as_str()).or_default().insert(b.as_str());
    }
    // Tarjan's algorithm (recursive: the graph has a few hundred nodes).
    struct S<'a> {
        adj: &'a BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for &w in s.adj.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = S {
        adj: &adj,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: Vec<&str> = tree.files.iter().map(String::as_str).collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Architecture invariant: the layers, lowest first, are util/tensor → vocab/instruct → data →
/// ops → backend → model/distributed → train → export/demo → binaries; 0 imports run up
/// or sideways within a layer, and 0 files import each other in a circle.
#[test]
fn imports_run_down_the_layers_without_circles() {
    let tree = Tree::load();
    for f in &tree.files {
        if let Some(top) = top_of(f)
            && !is_binary(f)
        {
            assert!(
                level_of(&top).is_some(),
                "{f}: top-level module `{top}` is in no layer of LEVELS: add it where it belongs"
            );
        }
    }
    let up = upward_imports(&tree);
    let c = circles(&tree);
    assert!(
        up.is_empty() && c.is_empty(),
        "{} import(s) run up the layers (see LEVELS):\n{}\n{} circle(s) of imports:\n{}",
        up.len(),
        up.join("\n"),
        c.len(),
        c.iter()
            .map(|c| c.join(" ↔ "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The reading itself: a known import is found and resolved through a re-export, and an upward
/// import written into a copy of a file is reported.
#[test]
fn the_import_reader_sees_what_it_must() {
    let mut tree = Tree::load();
    let edges = tree.edges();
    // `train/trainer.rs` names `DeviceZero2`, which `distributed/mod.rs` re-exports from
    // `distributed/zero_device.rs`.
    assert!(
        edges
            .iter()
            .any(|(a, b, _)| a == "src/train/trainer.rs" && b == "src/distributed/zero_device.rs"),
        "the reader no longer resolves re-exports"
    );
    // Make `ops/matmul.rs` import the model: the check must report it.
    let f = "src/ops/matmul.rs".to_string();
    let code = format!("use crate::model::Llama;\n{}", tree.code[&f]);
    tree.refs.insert(f.clone(), paths_of(&code));
    tree.code.insert(f.clone(), code);
    let up = upward_imports(&tree);
    assert!(
        up.iter()
            .any(|m| m.starts_with("src/ops/matmul.rs:1:") && m.contains("src/model/llama.rs")),
        "an upward import was not reported: {up:?}"
    );
    // And a circle: `util/hash.rs` importing `util/lock.rs`, which the test makes import it back.
    for (f, dep) in [
        ("src/util/hash.rs", "super::lock::RunLock"),
        ("src/util/lock.rs", "super::hash::mix64"),
    ] {
        let code = format!("use {dep};\n{}", tree.code[f]);
        tree.refs.insert(f.to_string(), paths_of(&code));
        tree.code.insert(f.to_string(), code);
    }
    let c = circles(&tree);
    assert!(
        c.iter().any(|c| c
            == &[
                "src/util/hash.rs".to_string(),
                "src/util/lock.rs".to_string()
            ]),
        "a circle was not reported: {c:?}"
    );
}

/// Architecture invariant: `backend/` knows ops and nothing of LLaMA — no file in `src/backend/`
/// refers to `model/`.
#[test]
fn the_backend_knows_nothing_of_the_model() {
    let tree = Tree::load();
    let bad: Vec<String> = tree
        .edges()
        .into_iter()
        .filter(|(a, b, _)| a.starts_with("src/backend/") && b.starts_with("src/model/"))
        .map(|(a, b, l)| format!("{a}:{l}: imports {b}"))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Architecture invariant: `cfg(feature = ...)` appears only inside `src/backend/` and
/// `src/distributed/` (the stub backend keeps the rest free of it).
#[test]
fn cfg_feature_only_in_backend_and_distributed() {
    let mut bad = Vec::new();
    for f in rust_files() {
        if CFG_FEATURE_DIRS.iter().any(|d| f.starts_with(d)) {
            continue;
        }
        let code = code_of(&read(&f));
        for needle in ["cfg(feature", "cfg!(feature", "cfg_attr(feature"] {
            for (at, _) in code.match_indices(needle) {
                bad.push(format!("{f}:{}: {needle}", line_of(&code, at)));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "cfg(feature) outside {CFG_FEATURE_DIRS:?}:\n{}",
        bad.join("\n")
    );
}

/// Architecture invariant: only the binaries (`src/main.rs`, `src/cli/`, `tools/*.rs`) read
/// environment variables and arguments; the library takes values, never the process's state.
#[test]
fn only_binaries_read_environment_and_arguments() {
    let mut bad = Vec::new();
    for f in rust_files() {
        if is_binary(&f) || ENV_EXCEPTIONS.iter().any(|(e, _)| *e == f) {
            continue;
        }
        let code = code_of(&read(&f));
        for needle in [
            "env::var(",
            "env::var_os(",
            "env::vars(",
            "env::vars_os(",
            "env::args(",
            "env::args_os(",
            "env::set_var(",
            "env::remove_var(",
        ] {
            for (at, _) in code.match_indices(needle) {
                bad.push(format!("{f}:{}: {needle}", line_of(&code, at)));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the library reads the environment or the arguments (pass the value in from the binary):\n{}",
        bad.join("\n")
    );
}

/// Architecture invariant: every file write, in the library and the binaries, goes through the
/// atomic helpers of `src/util/` (temp + rename); the files in WRITE_EXCEPTIONS stream into a temp path that is renamed, or
/// append to a log that is append-only by design.
#[test]
fn file_writes_only_through_the_atomic_helpers() {
    let mut bad = Vec::new();
    let mut files = rust_files();
    files.extend(
        files_under("tools")
            .into_iter()
            .filter(|f| f.ends_with(".rs")),
    );
    for f in files {
        if f.starts_with("src/util") || WRITE_EXCEPTIONS.iter().any(|(e, _)| *e == f) {
            continue;
        }
        let code = code_of(&read(&f));
        for needle in [
            "fs::write(",
            "File::create(",
            "OpenOptions::new(",
            "File::options(",
        ] {
            for (at, _) in code.match_indices(needle) {
                bad.push(format!("{f}:{}: {needle}", line_of(&code, at)));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "files written outside util::write_atomic and the listed exceptions:\n{}",
        bad.join("\n")
    );
    for (f, why) in WRITE_EXCEPTIONS {
        assert!(
            root().join(f).exists(),
            "WRITE_EXCEPTIONS lists {f} ({why}), which no longer exists: remove the entry"
        );
    }
}

/// Architecture invariant: no source file in `src/` or `tools/` is over 1,200 lines.
#[test]
fn no_source_file_over_the_line_limit() {
    let mut bad = Vec::new();
    let mut files = files_under("src");
    files.extend(files_under("tools"));
    for f in files {
        let ext = f.rsplit('.').next().unwrap_or("");
        if !["rs", "py", "sh", "cu", "cuh", "cpp", "h", "toml"].contains(&ext) {
            continue;
        }
        let n = read(&f).lines().count();
        if n > MAX_LINES {
            bad.push(format!("{f}: {n} lines"));
        }
    }
    assert!(
        bad.is_empty(),
        "over {MAX_LINES} lines:\n{}",
        bad.join("\n")
    );
}

/// Where `src` (a file's text, named `file`) silences `clippy::too_many_arguments` — an `allow`,
/// `expect` or `cfg_attr` naming it — as `file:line`; comments and string literals do not count
/// (read through [`code_of`]).
fn argument_allows(file: &str, src: &str) -> Vec<String> {
    let code = code_of(src);
    code.match_indices("too_many_arguments")
        .map(|(at, _)| format!("{file}:{}", line_of(&code, at)))
        .collect()
}

/// Architecture invariant: op signatures take shape structs (`backend::GemmShape`, `AttnShape`,
/// ...) and a backward takes what its forward saved as one group, so no function in `src/` needs
/// `#[allow(clippy::too_many_arguments)]` (exceptions listed with their reasons).
#[test]
fn no_too_many_arguments_allow_in_src() {
    let mut bad = Vec::new();
    for f in rust_files() {
        if ARGUMENT_ALLOW_EXCEPTIONS.iter().any(|(e, _)| *e == f) {
            continue;
        }
        bad.extend(argument_allows(&f, &read(&f)));
    }
    assert!(
        bad.is_empty(),
        "clippy::too_many_arguments silenced (group the sizes into a shape struct, the saved tensors \
         into a struct, or the settings into a context):\n{}",
        bad.join("\n")
    );
    for (f, why) in ARGUMENT_ALLOW_EXCEPTIONS {
        assert!(
            root().join(f).exists() && !argument_allows(f, &read(f)).is_empty(),
            "ARGUMENT_ALLOW_EXCEPTIONS lists {f} ({why}), which no longer silences the lint: \
             remove the entry"
        );
    }
}

/// The reading itself: an allow, an `expect` and a `cfg_attr` written into a copy of a file are
/// reported at their lines; the same words in a comment or a string are not.
#[test]
fn the_argument_allow_reader_sees_what_it_must() {
    let f = "src/ops/matmul.rs";
    let src = read(f);
    assert!(argument_allows(f, &src).is_empty(), "{f} has an allow");
    let planted = format!(
        "// #[allow(clippy::too_many_arguments)]\n\
         const S: &str = \"#[allow(clippy::too_many_arguments)]\";\n\
         #[allow(clippy::too_many_arguments)]\n\
         fn a() {{}}\n\
         #[expect(clippy::too_many_arguments)]\n\
         fn b() {{}}\n\
         #[cfg_attr(not(test), allow(clippy::too_many_arguments))]\n\
         {src}"
    );
    assert_eq!(
        argument_allows(f, &planted),
        [3, 5, 7].map(|l| format!("{f}:{l}")),
        "planted allows not reported at their lines"
    );
}

/// ARCHITECTURE.md states the layers this test checks, in this order.
#[test]
fn architecture_md_states_the_checked_layers() {
    let doc = read("ARCHITECTURE.md");
    let want = LEVELS
        .iter()
        .map(|l| l.join("/"))
        .collect::<Vec<_>>()
        .join(" → ");
    assert!(
        doc.contains(&want),
        "ARCHITECTURE.md does not state the layers as `{want}`"
    );
}
