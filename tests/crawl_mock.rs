//! crawl-prompts against a mock OpenAI-compatible server on 127.0.0.1 (random port): injected
//! failures, rate limits, key hygiene, kill -9 and resume. Loopback only; every run is bounded.

use serde_json::{Value, json};
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-7Qx9pL2mZ8-do-not-leak";

// ---------------------------------------------------------------- mock server

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    auth: Option<String>,
    body: String,
}

/// What the server does with one request.
enum Reply {
    /// A chat completion with this message content.
    Chat {
        content: String,
        usage: Option<(u64, u64)>,
        finish: &'static str,
    },
    /// Any status with extra headers and a raw body.
    Status {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait, then reply (the client should have timed out by then).
    Slow(Duration, Box<Reply>),
    /// Close the connection without answering.
    Drop,
    /// Promise more body than is sent, then close.
    TruncatedBody(String),
}

type Handler = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

struct Mock {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Times at which a 429 response finished being written.
    sent_429: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(handler: Arc<Handler>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sent_429 = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (seen2, sent2, stop2) = (seen.clone(), sent_429.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (h, seen, sent, count) =
                            (handler.clone(), seen2.clone(), sent2.clone(), count.clone());
                        std::thread::spawn(move || serve(s, &*h, &seen, &sent, &count));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Mock {
            addr,
            seen,
            sent_429,
            stop,
            accept: Some(accept),
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            h.join().unwrap();
        }
    }
}

/// Read one HTTP/1.1 request; None if the client went away.
fn read_request(s: &mut TcpStream) -> Option<Seen> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if !line.starts_with("POST /v1/chat/completions ") {
        return None;
    }
    let (mut len, mut auth) = (0usize, None);
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let at = Instant::now();
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(Seen {
        at,
        auth,
        body: String::from_utf8(body).ok()?,
    })
}

fn serve(
    mut s: TcpStream,
    h: &Handler,
    seen: &Mutex<Vec<Seen>>,
    sent_429: &Mutex<Vec<Instant>>,
    count: &AtomicUsize,
) {
    let Some(req) = read_request(&mut s) else {
        return;
    };
    let n = {
        let mut v = seen.lock().unwrap();
        v.push(req.clone());
        count.fetch_add(1, Ordering::SeqCst)
    };
    let mut reply = h(n, &req);
    while let Reply::Slow(d, next) = reply {
        std::thread::sleep(d);
        reply = *next;
    }
    let write = |s: &mut TcpStream,
                 code: u16,
                 headers: &[(String, String)],
                 body: &str,
                 claimed: usize| {
        let mut head = format!(
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {claimed}\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += "\r\n";
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body.as_bytes());
        let _ = s.flush();
    };
    match reply {
        Reply::Chat {
            content,
            usage,
            finish,
        } => {
            let mut v = json!({
                "id": "chatcmpl-mock", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            });
            if let Some((p, c)) = usage {
                v["usage"] =
                    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
            }
            let b = v.to_string();
            write(&mut s, 200, &[], &b, b.len());
        }
        Reply::Status {
            code,
            headers,
            body,
        } => {
            write(&mut s, code, &headers, &body, body.len());
            if code == 429 {
                sent_429.lock().unwrap().push(Instant::now());
            }
        }
        Reply::TruncatedBody(b) => write(&mut s, 200, &[], &b[..b.len() / 2], b.len()),
        Reply::Drop => {}
        Reply::Slow(..) => unreachable!(),
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

// ---------------------------------------------------------------- data

/// Tiny deterministic generator (SplitMix64), so the mock does not depend on the crate under test.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Random CJK text: over a 20 000-character alphabet two such strings share almost nothing,
    /// so fresh items are never near duplicates of each other.
    fn cjk(&mut self, lo: u64, hi: u64) -> String {
        let n = lo + self.below(hi - lo + 1);
        (0..n)
            .map(|_| char::from_u32(0x4E00 + self.below(20_000) as u32).unwrap())
            .collect()
    }
    fn item(&mut self) -> Rec {
        let input = if self.below(2) == 0 {
            String::new()
        } else {
            self.cjk(5, 30)
        };
        Rec {
            instruction: self.cjk(12, 20),
            input,
            output: self.cjk(10, 60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Rec {
    instruction: String,
    input: String,
    output: String,
}

impl Rec {
    fn json(&self) -> Value {
        json!({"instruction": self.instruction, "input": self.input, "output": self.output})
    }
}

fn hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and processes.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A copy of `r` with one instruction character changed: ROUGE-L ≥ 1 − 1/len ≥ 0.94, a near duplicate.
fn near_dup(r: &Rec) -> Rec {
    let mut cs: Vec<char> = r.instruction.chars().collect();
    let mid = cs.len() / 2;
    cs[mid] = '改';
    Rec {
        instruction: cs.into_iter().collect(),
        input: r.input.clone(),
        output: "近似重复".into(),
    }
}

/// Render items in one of the shapes models use, so the parser is exercised end to end.
fn render(items: &[Value], shape: usize, truncated_tail: Option<&Value>) -> String {
    let mut body = match shape % 4 {
        0 => serde_json::to_string(items).unwrap(),
        1 => format!(
            "好的，下面是任务：\n```json\n{}\n```\n",
            serde_json::to_string_pretty(items).unwrap()
        ),
        2 => items
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{}. {}\n", i + 1, v))
            .collect(),
        _ => {
            // Wrapper object with trailing commas.
            let inner: Vec<String> = items.iter().map(|v| format!("{v},")).collect();
            format!("{{\"tasks\": [{}],}}", inner.join("\n"))
        }
    };
    if let Some(t) = truncated_tail {
        let s = t.to_string();
        let cut: String = s.chars().take(s.chars().count() / 2).collect();
        body = format!(
            "[{}, {}",
            items
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            cut
        );
    }
    body
}

fn lcs(a: &[char], b: &[char]) -> usize {
    let mut t = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i][j] = if a[i - 1] == b[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t[a.len()][b.len()]
}

// ---------------------------------------------------------------- running the binary

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_crawl-prompts"));
    for v in [
        "OPENAI_API_KEY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

fn args(c: &mut Command, mock: &Mock, out: &Path, target: u64, extra: &[&str]) {
    c.args([
        "--base-url",
        &mock.base_url(),
        "--model",
        "mock-model",
        "--output",
    ])
    .arg(out)
    .args(["--target", &target.to_string(), "--max-retries", "6"])
    .args([
        "--backoff-base",
        "0.05",
        "--backoff-cap",
        "0.2",
        // Far above any reply here, so a loaded box never causes a spurious timeout and retry.
        "--timeout",
        "20",
    ])
    .args(extra);
}

fn run(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    if !o.status.success() {
        panic!(
            "crawl-prompts failed: {}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    o
}

fn records(path: &Path) -> Vec<Rec> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            assert_eq!(
                keys,
                BTreeSet::from(["instruction", "input", "output"]),
                "{l}"
            );
            Rec {
                instruction: v["instruction"].as_str().unwrap().into(),
                input: v["input"].as_str().unwrap().into(),
                output: v["output"].as_str().unwrap().into(),
            }
        })
        .collect()
}

/// No exact duplicate, and no pair of instructions at ROUGE-L F ≥ 0.7 (checked by brute force
/// over characters: every instruction here is CJK, one token per character).
fn assert_no_duplicates(recs: &[Rec]) {
    let set: HashSet<&str> = recs.iter().map(|r| r.instruction.as_str()).collect();
    assert_eq!(
        set.len(),
        recs.len(),
        "exact duplicate instruction in output"
    );
    let cs: Vec<Vec<char>> = recs
        .iter()
        .map(|r| r.instruction.chars().collect())
        .collect();
    for i in 0..cs.len() {
        for j in 0..i {
            let f = 2.0 * lcs(&cs[i], &cs[j]) as f64 / (cs[i].len() + cs[j].len()) as f64;
            assert!(
                f < 0.7,
                "near duplicates kept: {:?} / {:?} ({f})",
                recs[i],
                recs[j]
            );
        }
    }
}

/// The key appears nowhere under `dir` nor in the process output.
fn assert_no_key(dir: &Path, o: &Output) {
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(KEY),
        "key on stdout"
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains(KEY),
        "key on stderr"
    );
    let mut files = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        files += 1;
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "key written to {}",
            p.display()
        );
    }
    assert!(
        files >= 2,
        "expected the output and the raw log in {}",
        dir.display()
    );
}

fn raw_log(out: &Path) -> Vec<Value> {
    let mut p = out.as_os_str().to_owned();
    p.push(".raw.jsonl");
    std::fs::read_to_string(PathBuf::from(p))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---------------------------------------------------------------- tests

/// Every failure a long crawl meets, in one scripted run with two workers. The universe of valid
/// fresh items is exactly the target, so reaching the target proves no valid item was lost; decoys
/// (items of timed-out / cut replies, blacklisted, truncated, near duplicates) must never appear.
#[test]
fn survives_injected_failures_and_loses_nothing() {
    const TARGET: usize = 45;
    let mut g = Gen(11);
    let universe: Vec<Rec> = (0..TARGET).map(|_| g.item()).collect();
    let decoys: Arc<Mutex<Vec<Rec>>> = Arc::new(Mutex::new(Vec::new()));
    let next_fresh = Arc::new(Mutex::new((0usize, 0usize))); // (next universe index, ok replies)
    let (u2, d2, nf) = (universe.clone(), decoys.clone(), next_fresh.clone());
    let decoy_gen = Mutex::new(Gen(99));
    let handler: Arc<Handler> = Arc::new(move |n, seen| {
        let decoy = || {
            let r = decoy_gen.lock().unwrap().item();
            d2.lock().unwrap().push(r.clone());
            r
        };
        let chat = |content: String| Reply::Chat {
            content,
            usage: Some((500, 800)),
            finish: "stop",
        };
        match n {
            // Arrives with request 1 (two workers): refused with a 1 s Retry-After.
            0 => Reply::Status {
                code: 429,
                headers: vec![("Retry-After".into(), "1".into())],
                body: r#"{"error":{"message":"rate limited"}}"#.into(),
            },
            // Answered after the 429, so its retry must also wait out the Retry-After.
            1 => Reply::Slow(
                Duration::from_millis(200),
                Box::new(Reply::Status {
                    code: 500,
                    headers: vec![],
                    body: "internal".into(),
                }),
            ),
            2 => Reply::Slow(
                Duration::from_secs(8),
                Box::new(chat(render(&[decoy().json()], 0, None))),
            ),
            3 => Reply::Drop,
            4 => chat(
                "以下是二十条任务：{instruction: 写诗, output: 好} 抱歉，其余的写不出来。".into(),
            ),
            5 => Reply::TruncatedBody(
                json!({"choices": [{"message": {"content": render(&[decoy().json()], 0, None)}}]})
                    .to_string(),
            ),
            6 => Reply::Status {
                code: 200,
                headers: vec![],
                body: "<html>502 Bad Gateway</html>".into(),
            },
            // A proxy that echoes the request's credentials in its error page.
            7 => Reply::Status {
                code: 502,
                headers: vec![],
                body: format!("bad upstream for {}", seen.auth.clone().unwrap_or_default()),
            },
            _ => {
                let mut st = nf.lock().unwrap();
                let (start, k) = *st;
                let end = (start + 8).min(u2.len());
                st.0 = end;
                st.1 += 1;
                let mut items: Vec<Value> = Vec::new();
                for (i, r) in u2[start..end].iter().enumerate() {
                    items.push(r.json());
                    if i == 1 {
                        items.push(near_dup(r).json()); // after its original: rejected
                        d2.lock().unwrap().push(near_dup(r));
                    }
                }
                if start > 0 {
                    items.push(u2[start - 1].json()); // exact copy of an earlier item
                }
                items.push(json!({"instruction": "只有指令没有输出"}));
                items.push(json!({"instruction": "", "input": "", "output": "空指令"}));
                let mut bl = decoy();
                bl.output = format!("作为一个AI语言模型，{}", bl.output);
                d2.lock().unwrap().push(bl.clone());
                items.push(bl.json());
                let tail = decoy().json();
                let truncated = k % 2 == 0;
                chat(render(&items, k, truncated.then_some(&tail)))
            }
        }
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = bin();
    args(
        &mut c,
        &mock,
        &out,
        TARGET as u64,
        // 3 s: far above a normal reply even on a loaded box, far below the 8 s slow reply.
        &["--concurrency", "2", "--timeout", "3"],
    );
    c.env("OPENAI_API_KEY", KEY);
    let o = run(&mut c);

    let got = records(&out);
    assert_eq!(got.len(), TARGET, "target not reached exactly");
    assert_no_duplicates(&got);
    let got_set: BTreeSet<Rec> = got.into_iter().collect();
    let want: BTreeSet<Rec> = universe.into_iter().collect();
    assert_eq!(
        got_set, want,
        "output differs from the valid fresh items served"
    );
    for d in decoys.lock().unwrap().iter() {
        assert!(!got_set.contains(d), "decoy kept: {d:?}");
    }

    let seen = mock.seen();
    // Every request carried the key (so the redaction checks below are meaningful).
    assert!(
        seen.iter()
            .all(|s| s.auth.as_deref() == Some(&format!("Bearer {KEY}")[..]))
    );
    // Retry-After: no request started within 1 s of the 429 being sent, except request 1, which
    // was already in flight. 20 ms: the client starts its wait when it reads the response, a few
    // microseconds after the server stamps the end of its write, never before.
    let t429 = mock.sent_429.lock().unwrap()[0];
    let mut after: Vec<_> = seen.iter().skip(2).map(|s| s.at).collect();
    after.sort();
    assert!(
        after[0] + Duration::from_millis(20) >= t429 + Duration::from_secs(1),
        "Retry-After not honoured"
    );

    // The summary counts what was injected; the raw log has every reply, with the key redacted.
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains(&format!("kept {TARGET} / target {TARGET}")),
        "{err}"
    );
    // Exactly what the script injected: one 429, two 5xx (500, 502), one slow reply, a dropped
    // connection and a cut body, one 200 whose body is not JSON.
    assert!(
        err.contains("errors: 429 1, 5xx 2, timeouts 1, connection 2, bad body 1"),
        "injected failures miscounted:\n{err}"
    );
    // Each kind of bad item the replies carried was counted under its reason.
    for needle in [
        "near_dup",
        "exact_dup",
        "blacklisted",
        "truncated_item",
        "missing_field",
        "empty_field",
        "malformed_json",
    ] {
        assert!(err.contains(needle), "summary lacks {needle:?}:\n{err}");
    }
    let raw = raw_log(&out);
    assert!(raw.iter().any(|v| {
        v["body"]
            .as_str()
            .is_some_and(|b| b.contains("Bearer [REDACTED]"))
    }));
    assert!(raw.iter().any(|v| v["status"] == 429));
    assert!(raw.iter().any(|v| v["error"] == "timeout"));
    assert_no_key(dir.path(), &o);
}

/// Allowance for the variation of connect latency between two requests, when request starts are
/// measured at the server (see `rpm_limit_spaces_requests`).
const SLACK: f64 = 0.25;

/// `--rpm 60`: request starts at least 1 s apart, measured at the server, with three workers
/// that would otherwise fire at once.
#[test]
fn rpm_limit_spaces_requests() {
    let g = Mutex::new(Gen(5));
    let handler: Arc<Handler> = Arc::new(move |_, _| Reply::Chat {
        content: {
            let mut g = g.lock().unwrap();
            render(&[g.item().json(), g.item().json()], 0, None)
        },
        usage: None,
        finish: "stop",
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut c = bin();
    args(
        &mut c,
        &mock,
        &out,
        8,
        &["--concurrency", "3", "--rpm", "60", "--api-key-file"],
    );
    c.arg(&key_file);
    let o = run(&mut c);
    assert_eq!(records(&out).len(), 8);
    let mut at: Vec<Instant> = mock.seen().iter().map(|s| s.at).collect();
    at.sort();
    assert!(at.len() >= 4, "{} requests", at.len());
    // Starts are scheduled exactly 1 s apart (the client sleeps until its reserved start, and
    // sleeps never end early); arrival at the server adds the connect latency, which varies with
    // scheduling on this shared 2-core box (the first request of a process is the slowest),
    // hence SLACK on each gap...
    for w in at.windows(2) {
        let gap = (w[1] - w[0]).as_secs_f64();
        assert!(gap >= 1.0 - SLACK, "gap {gap:.3} s < 1 s - {SLACK} s slack");
    }
    // ...but only one on the total: n requests span at least (n-1) s minus one slack.
    let span = (at[at.len() - 1] - at[0]).as_secs_f64();
    assert!(span >= (at.len() - 1) as f64 - SLACK, "span {span:.3}");
    assert!(
        mock.seen()
            .iter()
            .all(|s| s.auth.as_deref() == Some(&format!("Bearer {KEY}")[..]))
    );
    assert_no_key(dir.path(), &o);
}

/// `--tpm 6000` with replies reporting 100 tokens each: 100 tokens/s, so starts 1 s apart.
#[test]
fn tpm_limit_uses_reported_usage() {
    let g = Mutex::new(Gen(6));
    let handler: Arc<Handler> = Arc::new(move |_, _| Reply::Chat {
        content: {
            let mut g = g.lock().unwrap();
            render(&[g.item().json(), g.item().json()], 0, None)
        },
        usage: Some((60, 40)),
        finish: "stop",
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = bin();
    args(
        &mut c,
        &mock,
        &out,
        8,
        &["--concurrency", "1", "--tpm", "6000"],
    );
    let o = run(&mut c);
    assert_eq!(records(&out).len(), 8);
    let at: Vec<Instant> = mock.seen().iter().map(|s| s.at).collect();
    assert_eq!(at.len(), 4);
    for w in at.windows(2) {
        let gap = (w[1] - w[0]).as_secs_f64();
        // Same arrival slack as the rpm test.
        assert!(gap >= 1.0 - SLACK, "gap {gap:.3} s");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tokens: prompt 240, completion 160"), "{err}");
}

/// A deterministic server: each reply is a function of the prompt only (which depends on --seed
/// and the request number), drawing 6 items from a fixed pool of 100 plus a near duplicate of one
/// of them placed first, so which variant is kept depends on the order requests are made in.
fn deterministic_handler(delay: Duration) -> Arc<Handler> {
    let mut g = Gen(2024);
    let pool: Vec<Rec> = (0..100).map(|_| g.item()).collect();
    Arc::new(move |_, seen| {
        let v: Value = serde_json::from_str(&seen.body).unwrap();
        let prompt = v["messages"][0]["content"].as_str().unwrap();
        let mut r = Gen(hash(prompt));
        let picks: Vec<&Rec> = (0..6).map(|_| &pool[r.below(100) as usize]).collect();
        let mut items = vec![near_dup(picks[0]).json()];
        items.extend(picks.iter().map(|p| p.json()));
        Reply::Slow(
            delay,
            Box::new(Reply::Chat {
                content: render(&items, r.below(4) as usize, None),
                usage: Some((100, 200)),
                finish: "stop",
            }),
        )
    })
}

fn count_lines(p: &Path) -> usize {
    std::fs::read(p)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// kill -9 in the middle of a crawl, rerun: the final set equals an uninterrupted run's, and the
/// rerun asks only the requests that had not been committed.
#[test]
fn kill_9_then_resume_equals_uninterrupted_run() {
    const TARGET: u64 = 50;
    let mock = Mock::start(deterministic_handler(Duration::from_millis(40)));
    let dir = tempfile::tempdir().unwrap();
    let common = ["--concurrency", "1", "--seed", "42"];

    let full = dir.path().join("full.jsonl");
    let mut c = bin();
    args(&mut c, &mock, &full, TARGET, &common);
    run(&mut c);
    let n_full = mock.seen().len();
    let want: BTreeSet<Rec> = records(&full).into_iter().collect();
    assert_eq!(want.len(), TARGET as usize);

    let killed = dir.path().join("killed.jsonl");
    let mut c = bin();
    args(&mut c, &mock, &killed, TARGET, &common);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_lines(&killed) < 20 {
        assert!(Instant::now() < deadline, "crawl made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "crawl ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = count_lines(&killed) as u64;
    assert!(
        at_kill < TARGET,
        "killed too late to test anything ({at_kill})"
    );
    let committed = raw_log(&killed)
        .iter()
        .filter(|v| v["done"] == true)
        .count();
    // A request the killed process had already sent may still be being read by a server thread;
    // let it land before counting (the server reads a whole request in well under 200 ms).
    std::thread::sleep(Duration::from_millis(200));
    let before = mock.seen().len();

    let mut c = bin();
    args(&mut c, &mock, &killed, TARGET, &common);
    let o = run(&mut c);
    let got = records(&killed);
    assert_eq!(got.len(), TARGET as usize);
    assert_no_duplicates(&got);
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{at_kill} found at start")), "{err}");
    // Resume re-asks exactly the requests without a commit marker: the uninterrupted run needed
    // n_full, the killed one had committed `committed` of the same prompts.
    assert_eq!(mock.seen().len() - before, n_full - committed);
}

/// A torn last line (a write cut by a crash) is cut off, the index is rebuilt from the whole
/// lines, and the crawl completes to the same set; with no raw log it re-asks from request 0.
#[test]
fn torn_last_line_is_truncated_and_crawl_completes() {
    let mock = Mock::start(deterministic_handler(Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let common = ["--concurrency", "1", "--seed", "7"];
    let full = dir.path().join("full.jsonl");
    let mut c = bin();
    args(&mut c, &mock, &full, 30, &common);
    run(&mut c);
    let want: BTreeSet<Rec> = records(&full).into_iter().collect();

    let bytes = std::fs::read(&full).unwrap();
    let ends: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    // Ten whole lines and 7 bytes of the eleventh (which may split a UTF-8 character).
    let cut = ends[9] + 1 + 7;
    let torn = dir.path().join("torn.jsonl");
    std::fs::write(&torn, &bytes[..cut]).unwrap();
    let mut c = bin();
    args(&mut c, &mock, &torn, 30, &common);
    let o = run(&mut c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cut a torn last line at start: output 7 bytes"),
        "{err}"
    );
    assert!(err.contains("10 found at start"), "{err}");
    let got = records(&torn);
    assert_no_duplicates(&got);
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
}

/// A complete line that is not a record is not silently dropped: a clear error names file and line.
#[test]
fn corrupt_output_line_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.jsonl");
    std::fs::write(
        &out,
        "{\"instruction\":\"a\",\"input\":\"\",\"output\":\"b\"}\nnot json\n",
    )
    .unwrap();
    // Port 9 (discard) is never contacted: the error comes before any request.
    let o = bin()
        .args(["--base-url", "http://127.0.0.1:9/v1", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.jsonl:2: not an instruction record"),
        "{err}"
    );
}

/// Bad input that needs no server: a template with an unknown placeholder.
#[test]
fn bad_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.txt");
    std::fs::write(&t, "给我{{n_items}}条，关于{{topic}}").unwrap();
    let o = bin()
        .args(["--base-url", "http://127.0.0.1:9/v1", "--output"])
        .arg(dir.path().join("o.jsonl"))
        .arg("--prompt-template")
        .arg(&t)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("t.txt:1: unknown placeholder {{topic}}"),
        "{err}"
    );
}

/// A 4xx other than 408/429 (bad key, unknown model) is not retried: the run stops at once with
/// the status, and the body's echo of the key is redacted in the message and the raw log.
#[test]
fn auth_error_stops_at_once_without_leaking_the_key() {
    let handler: Arc<Handler> = Arc::new(|_, seen| Reply::Status {
        code: 401,
        headers: vec![],
        body: format!(
            "{{\"error\":{{\"message\":\"Incorrect API key provided: {}\"}}}}",
            seen.auth.clone().unwrap_or_default()
        ),
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = bin();
    args(&mut c, &mock, &out, 10, &["--concurrency", "1"]);
    c.env("OPENAI_API_KEY", KEY);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("Bearer [REDACTED]"), "{err}");
    assert_eq!(mock.seen().len(), 1, "a 401 must not be retried");
    // Nothing was kept, but the output and raw log exist (created at start).
    assert_no_key(dir.path(), &o);
}

/// `--max-requests` bounds a run that cannot reach its target (every reply is a duplicate); the
/// exit status says the target was not reached.
#[test]
fn max_requests_bounds_a_run() {
    let one = Rec {
        instruction: "重复的指令".into(),
        input: String::new(),
        output: "同样的回答".into(),
    };
    let handler: Arc<Handler> = Arc::new(move |_, _| Reply::Chat {
        content: render(&[one.json()], 0, None),
        usage: None,
        finish: "stop",
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = bin();
    args(
        &mut c,
        &mock,
        &out,
        10,
        &["--concurrency", "2", "--max-requests", "5"],
    );
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    // Five requests; a transient error on this loaded box could add a retry (an attempt), never a
    // request, so the server must have seen exactly as many attempts as the summary reports.
    assert!(err.contains("requests 5 (attempts "), "{err}");
    let attempts = format!("(attempts {},", mock.seen().len());
    assert!(err.contains(&attempts), "server saw {attempts} but:\n{err}");
    assert_eq!(records(&out).len(), 1);
    assert!(err.contains("rejected [exact_dup 4]"), "{err}");
    assert!(err.contains("target not reached"), "{err}");
}

/// A model that only repeats itself stops the run by itself (`--max-stalled-replies`), with an
/// error pointing at the raw log; without a terminal, progress goes to stderr as log lines.
#[test]
fn stalled_crawl_stops_by_itself() {
    let one = Rec {
        instruction: "还是那条指令".into(),
        input: String::new(),
        output: "还是那个回答".into(),
    };
    let handler: Arc<Handler> = Arc::new(move |_, _| Reply::Chat {
        content: render(&[one.json()], 1, None),
        usage: None,
        finish: "stop",
    });
    let mock = Mock::start(handler);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut c = bin();
    args(
        &mut c,
        &mock,
        &out,
        10,
        &["--concurrency", "1", "--max-stalled-replies", "3"],
    );
    c.args(["--log-every", "0.000001"]);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // One reply kept the record, the next three added nothing (as in `max_requests_bounds_a_run`,
    // attempts may exceed requests only by retries, and the server saw every attempt).
    assert!(err.contains("requests 4 (attempts "), "{err}");
    let attempts = format!("(attempts {},", mock.seen().len());
    assert!(err.contains(&attempts), "server saw {attempts} but:\n{err}");
    assert!(err.contains("the last 3 replies added no record"), "{err}");
    assert!(err.contains("kept 1/10 | rejected [exact_dup"), "{err}");
    assert_eq!(records(&out).len(), 1);
}
