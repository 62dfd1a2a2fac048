//! Encoding speed of the merged Chinese-LLaMA tokenizer (49953) on the Chinese corpus, in tokens:
//! one thread (`encode` per line) and all threads (`encode_batch`).
//! `cargo bench --bench tokenize`; comparison with python: tools/oracle/bench_tokenize.py.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;
use zhllama::vocab::{ModelProto, Tokenizer, merge_models};

fn bench(c: &mut Criterion) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let tk = data.join("tokenizers");
    let Ok(llama) = std::fs::read(tk.join("llama_tokenizer.model")) else {
        eprintln!("SKIP: {} not found (shared data absent)", data.display());
        return;
    };
    let mut model = ModelProto::parse(&llama).unwrap();
    let zh = ModelProto::parse(&std::fs::read(tk.join("chinese_sp.model")).unwrap()).unwrap();
    merge_models(&mut model, &zh, false);
    let tok = Tokenizer::from_model(model).unwrap();
    let mut text = String::new();
    for f in ["cmrc2018_wiki_contexts.txt", "cmrc2019_stories_filled.txt"] {
        text += &std::fs::read_to_string(data.join("zh_corpus").join(f)).unwrap();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let tokens: usize = tok.encode_batch(&lines).iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("tokenize_zh_corpus_49953");
    g.throughput(Throughput::Elements(tokens as u64));
    g.sample_size(10);
    g.bench_function("encode_1_thread", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(tok.encode(l));
            }
        })
    });
    g.bench_function("encode_batch_all_threads", |b| {
        b.iter(|| black_box(tok.encode_batch(&lines)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
