//! `Llama::backward_with`'s readiness hook (for overlapping the gradient reduce-scatter with the
//! backward): every trainable tensor is reported exactly once, its gradient is already final when
//! reported (equal bit for bit to the value after the whole backward), reports come during the
//! backward (the embedding is not final yet at the first one), layers come last-first, and the
//! gradients equal plain `backward`'s.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use zhllama::backend::Backend;
use zhllama::backend::cpu::CpuBackend;
use zhllama::model::lora::{LoraConfig, Proj};
use zhllama::model::{Activations, Group, Kind, Llama, LlamaConfig, TrainSpec};

const V: usize = 61;

fn check(tied: bool, spec: TrainSpec) {
    let mut cfg = LlamaConfig::new(V, 32, 48, 3, 4, 2);
    cfg.initializer_range = 0.3;
    cfg.tie_word_embeddings = tied;
    let be = Arc::new(CpuBackend::new());
    let mut m = Llama::random(be.clone(), cfg, spec, 5).unwrap();
    // PEFT initialises LoRA B to zero, which leaves every A gradient zero (and "final when
    // reported" would compare 0 with 0): give B values.
    let mut host = m.download_params().unwrap();
    for e in m.layout().entries() {
        if matches!(e.kind, Kind::LoraB { .. }) {
            for (i, x) in host.trainable[e.range.clone()].iter_mut().enumerate() {
                *x = ((i * 7 % 13) as f32 - 6.0) * 0.01;
            }
        }
    }
    be.upload(m.trainable_mut(), &host.trainable).unwrap();
    let (b, t) = (2, 9);
    let ids: Vec<i32> = (0..b * t).map(|i| ((i * 17 + 3) % V) as i32).collect();
    let labels: Vec<i32> = (0..b * t).map(|i| ((i * 5 + 1) % V) as i32).collect();
    let p = m.layout().trainable_len();

    // Plain backward.
    let mut acts = Activations::new(&m, b, t).unwrap();
    m.forward(&mut acts, &ids, &labels).unwrap();
    let mut g0 = m.alloc_grads().unwrap();
    m.backward(&mut acts, &mut g0, 0.75).unwrap();
    let mut plain = vec![0f32; p];
    be.download(&g0, &mut plain).unwrap();

    // With the hook: snapshot the whole gradient at every report.
    let mut acts = Activations::new(&m, b, t).unwrap();
    m.forward(&mut acts, &ids, &labels).unwrap();
    let mut g = m.alloc_grads().unwrap();
    let mut reports: Vec<(Range<usize>, Vec<f32>)> = Vec::new();
    m.backward_with(&mut acts, &mut g, 0.75, &mut |buf, r| {
        let mut snap = vec![0f32; p];
        be.download(buf, &mut snap).unwrap();
        reports.push((r, snap));
    })
    .unwrap();
    let mut fin = vec![0f32; p];
    be.download(&g, &mut fin).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&fin),
        bits(&plain),
        "backward_with changed the gradients"
    );

    // Exactly the trainable entries, each once, each final when reported.
    let mut expected: HashMap<(usize, usize), String> = m
        .layout()
        .entries()
        .iter()
        .filter(|e| e.group == Group::Trainable)
        .map(|e| ((e.range.start, e.range.end), e.name.clone()))
        .collect();
    assert!(!expected.is_empty());
    // Every checked gradient carries signal: an all-zero tensor would make "final when reported"
    // and "equal to plain backward" hold trivially.
    for ((s, e), name) in &expected {
        assert!(
            fin[*s..*e].iter().any(|&x| x != 0.0),
            "{name}: gradient is all zero, the comparison would be vacuous"
        );
    }
    let mut order = Vec::new();
    for (r, snap) in &reports {
        let name = expected
            .remove(&(r.start, r.end))
            .unwrap_or_else(|| panic!("range {r:?} reported twice or not a trainable tensor"));
        assert_eq!(
            bits(&snap[r.clone()]),
            bits(&fin[r.clone()]),
            "{name}: reported before its gradient was final"
        );
        order.push(name);
    }
    assert!(
        expected.is_empty(),
        "never reported: {:?}",
        expected.values()
    );

    // Reports arrive during the backward: at the first one, the embedding's gradient (if it trains)
    // is not final yet (it is still zero; it is added at the very end).
    if let Some(e) = m.layout().get("model.embed_tokens.weight")
        && e.group == Group::Trainable
    {
        let first = &reports[0].1;
        assert!(fin[e.range.clone()].iter().any(|&x| x != 0.0));
        assert_ne!(bits(&first[e.range.clone()]), bits(&fin[e.range.clone()]));
        assert_eq!(order.last().unwrap(), "model.embed_tokens.weight");
    }
    // Layers last-first.
    let layer_of = |n: &str| -> Option<usize> {
        n.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let layers: Vec<usize> = order.iter().filter_map(|n| layer_of(n)).collect();
    assert!(layers.windows(2).all(|w| w[0] >= w[1]), "{order:?}");
}

#[test]
fn full_training_untied() {
    check(false, TrainSpec::full());
}

#[test]
fn full_training_tied() {
    check(true, TrainSpec::full());
}

#[test]
fn lora_with_embeddings_and_head() {
    let spec = TrainSpec {
        embed_tokens: true,
        lm_head: true,
        lora: Some(LoraConfig::new(4, 8.0, 0.0, &Proj::ALL, 3).unwrap()),
        ..TrainSpec::default()
    };
    check(false, spec);
}
