//! LoRA dropout: the backward applies the forward's mask (checked by finite differences of the
//! loss along each LoRA tensor's gradient), masks replay from the key, and evaluation ignores them.

mod model_common;

use model_common::*;
use zhllama::model::{Activations, LoraConfig, TrainSpec};

fn dropout_spec(p: f32) -> TrainSpec {
    let l = fixture_lora();
    TrainSpec {
        lora: Some(LoraConfig::new(l.r, l.alpha, p, &l.targets, 0).unwrap()),
        ..TrainSpec::frozen()
    }
}

#[test]
fn dropout_gradient_matches_finite_differences() {
    let r = read_reference("lora");
    let (ids, b, t) = ids(&r, "input_ids");
    let (labels, _, _) = model_common::ids(&r, "labels");
    let mut model = load_with_ref("lora", dropout_spec(0.3), &r);
    let mut acts = Activations::new(&model, b, t).unwrap();
    acts.training = true;
    acts.rng_key = 12345;
    let mut grads = model.alloc_grads().unwrap();
    model.forward(&mut acts, &ids, &labels).unwrap();
    model.backward(&mut acts, &mut grads, 1.0).unwrap();
    let entries: Vec<_> = model
        .layout()
        .entries()
        .iter()
        .filter(|e| e.group == zhllama::model::Group::Trainable)
        .cloned()
        .collect();
    assert_eq!(entries.len(), 20);
    for e in &entries {
        // Directional derivative along u = g/|g| (restricted to this tensor) must equal |g|.
        let g = &grads[e.range.clone()];
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 1e-4, "{}: gradient unexpectedly ~0", e.name);
        let theta: Vec<f32> = model.trainable()[e.range.clone()].to_vec();
        let eps = 1e-2f64;
        let mut loss_at = |sign: f64| {
            for ((p, t0), gi) in model.trainable_mut()[e.range.clone()]
                .iter_mut()
                .zip(&theta)
                .zip(g)
            {
                *p = (*t0 as f64 + sign * eps * *gi as f64 / norm) as f32;
            }
            let l = model.forward(&mut acts, &ids, &labels).unwrap() as f64;
            model.trainable_mut()[e.range.clone()].copy_from_slice(&theta);
            l
        };
        let fd = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * eps);
        // Central differences in f32: truncation O(eps²) ~1e-5 relative; rounding ~ (1e-6 · loss) /
        // eps ≈ 5e-4 absolute against |g| of 0.01–0.5. A missing or mismatched mask changes the
        // derivative by percents (measured agreement here: <= 7e-4 relative).
        let tol = 0.005 * norm + 5e-4;
        eprintln!("{:<50} |g| {norm:.5} fd {fd:.5}", e.name);
        assert!(
            (fd - norm).abs() <= tol,
            "{}: finite difference {fd} vs |g| {norm}",
            e.name
        );
    }
}

#[test]
fn dropout_replays_from_key_and_is_off_in_eval() {
    let r = read_reference("lora");
    let (ids, b, t) = ids(&r, "input_ids");
    let (labels, _, _) = model_common::ids(&r, "labels");
    let model = load_with_ref("lora", dropout_spec(0.3), &r);
    let mut acts = Activations::new(&model, b, t).unwrap();
    // Eval (training = false): no dropout, PEFT's loss (computed with dropout 0).
    let l_eval = model.forward(&mut acts, &ids, &labels).unwrap() as f64;
    let want = r["loss"].data[0];
    assert!((l_eval - want).abs() <= 1e-6 * want, "{l_eval} vs {want}");
    acts.training = true;
    acts.rng_key = 1;
    let l1 = model.forward(&mut acts, &ids, &labels).unwrap();
    let l1_again = model.forward(&mut acts, &ids, &labels).unwrap();
    acts.rng_key = 2;
    let l2 = model.forward(&mut acts, &ids, &labels).unwrap();
    assert_eq!(l1.to_bits(), l1_again.to_bits(), "same key, same masks");
    assert_ne!(l1, l2, "another key, other masks");
    assert!((l1 as f64 - l_eval).abs() > 1e-4, "dropout changed nothing");
}
