//! Every op gives bit-identical results on 1 and on 3 threads: reductions have a fixed order that
//! does not depend on how rayon splits the work (the module doc of `ops` promises this; training
//! runs are reproducible on any machine size).

mod ops_common;
use ops_common::*;
use zhllama::backend::AdamW;
use zhllama::backend::{AttnSaved, AttnShape, GemmShape, RmsNormSaved, RopeShape, RowShape};
use zhllama::ops;

/// Runs `f` inside a rayon pool of `threads` threads and returns its outputs.
fn on<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

/// All outputs of every op on one set of random inputs, concatenated.
fn all_outputs() -> Vec<f32> {
    let mut rng = Rng::new(100);
    let (b, t, h, hkv, d) = (2, 150, 4, 2, 16);
    let (n, c, v) = (b * t, 200, 3001);
    let mut res = Vec::new();

    let (m, nn, k) = (300, 257, 190);
    let a = rng.vec(m * k, 1.0);
    let bm = rng.vec(k * nn, 1.0);
    let mut o = rng.vec(m * nn, 1.0);
    ops::matmul(&mut o, &a, &bm, GemmShape::tn(m, nn, k), 0.5, 1.0);
    res.extend(o);

    let x = rng.vec(n * c, 1.0);
    let w = rng.vec(c, 1.0);
    let (mut y, mut r) = (vec![0.0; n * c], vec![0.0; n]);
    ops::rmsnorm_forward(&mut y, &mut r, &x, &w, RowShape { n, c }, 1e-5);
    let dout = rng.vec(n * c, 1.0);
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    ops::rmsnorm_backward(
        &mut dx,
        &mut dw,
        &dout,
        RmsNormSaved {
            x: &x,
            w: &w,
            rstd: &r,
        },
        RowShape { n, c },
    );
    res.extend(y.iter().chain(&r).chain(&dx).chain(&dw));

    let q = rng.vec(b * t * h * d, 1.0);
    let kk = rng.vec(b * t * hkv * d, 1.0);
    let vv = rng.vec(b * t * hkv * d, 1.0);
    let (mut ao, mut lse) = (vec![0.0; q.len()], vec![0.0; b * h * t]);
    ops::attention_forward(
        &mut ao,
        &mut lse,
        &q,
        &kk,
        &vv,
        AttnShape { b, t, h, hkv, d },
    );
    let dao = rng.vec(q.len(), 1.0);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; kk.len()], vec![0.0; vv.len()]);
    ops::attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &dao,
        AttnSaved {
            q: &q,
            k: &kk,
            v: &vv,
            out: &ao,
            lse: &lse,
        },
        AttnShape { b, t, h, hkv, d },
    );
    let mut qr = q.clone();
    ops::rope_forward(
        &mut qr,
        RopeShape {
            b,
            t,
            h,
            d,
            theta: 10000.0,
            pos_offset: 0,
        },
    );
    res.extend(
        ao.iter()
            .chain(&lse)
            .chain(&dq)
            .chain(&dk)
            .chain(&dv)
            .chain(&qr),
    );

    let g = rng.vec(n * c, 4.0);
    let (mut s, mut dg, mut du) = (vec![0.0; n * c], vec![0.0; n * c], vec![0.0; n * c]);
    ops::swiglu_forward(&mut s, &g, &x);
    ops::swiglu_backward(&mut dg, &mut du, &dout, &g, &x);
    res.extend(s.iter().chain(&dg).chain(&du));

    let ids: Vec<i32> = (0..n).map(|_| rng.below(7) as i32).collect();
    let mut dt = vec![0.0; 7 * c];
    ops::embedding_backward(&mut dt, &dout, &ids, n, c);
    res.extend(dt);

    let logits = rng.vec(n * v, 5.0);
    let targets: Vec<i32> = (0..n)
        .map(|i| {
            if i % 7 == 0 {
                -100
            } else {
                rng.below(v) as i32
            }
        })
        .collect();
    let (mut losses, mut dl) = (vec![0.0; n], vec![0.0; n * v]);
    ops::cross_entropy_forward(&mut losses, &logits, &targets, n, v);
    ops::cross_entropy_backward(&mut dl, &logits, &targets, n, v, 0.01);
    res.extend(losses.iter().chain(&dl));

    let mut p = rng.vec(50_000, 1.0);
    let (mut mm, mut vm) = (vec![0.0; p.len()], vec![0.0; p.len()]);
    let grad = rng.vec(p.len(), 1.0);
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };
    ops::adamw_step(&mut p, &mut mm, &mut vm, &grad, hp);
    res.extend(p.iter().chain(&mm).chain(&vm));
    res.push(ops::sum_squares(&x) as f32);
    res
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let one = on(1, all_outputs);
    let three = on(3, all_outputs);
    assert_eq!(one.len(), three.len());
    let differing = one
        .iter()
        .zip(&three)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} outputs differ between 1 and 3 threads",
        one.len()
    );
}
