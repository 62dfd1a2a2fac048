//! What the shard payload checksums cost: open a realistic pre-training shard (50M u16 tokens in
//! blocks of 512, 100 MB — the order of one shard of the recipe's corpus) and read every block,
//! with the payload verified at open (what training does) and without. The file is in the page
//! cache for both, so the difference is the checksum pass itself; a cold read is disk-bound and
//! touches the same pages either way.
//! `cargo bench --bench shard`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use zhllama::data::shard::{BlockShard, ShardKind, ShardWriter};

const BLOCK: usize = 512;

fn bench(c: &mut Criterion) {
    let tokens: usize = 50_000_000;
    let blocks = tokens / BLOCK;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.tok");
    let mut w = ShardWriter::create(&path, ShardKind::Blocks, 49954, BLOCK).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut ids = vec![0u32; BLOCK];
    for _ in 0..blocks {
        for t in ids.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *t = (x % 49954) as u32;
        }
        w.push_block(&ids).unwrap();
    }
    w.finish().unwrap();

    let read_all = |verify: bool| {
        let s = BlockShard::open_with(&path, verify).unwrap();
        let mut out = vec![0u32; BLOCK];
        let mut sum = 0u64;
        for i in 0..s.len() {
            s.read_block(i, &mut out);
            sum += out[i % BLOCK] as u64;
        }
        sum
    };
    let mut g = c.benchmark_group(format!("shard_open_read_{}M_tokens", tokens / 1_000_000));
    g.throughput(Throughput::Bytes((blocks * BLOCK * 2) as u64));
    g.sample_size(10);
    g.bench_function("verified", |b| b.iter(|| black_box(read_all(true))));
    g.bench_function("unverified", |b| b.iter(|| black_box(read_all(false))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
