//! `CpuBackend` wires every trait method to the same-named `ops` function with the arguments in
//! order: each method's result must be bit-identical to the direct call (the ops themselves are
//! checked against references in the other `ops_*` tests). Swapped arguments of equal shape would
//! change the result, so every tensor gets distinct random content.

mod ops_common;
use ops_common::*;
use zhllama::backend::cpu::CpuBackend;
use zhllama::backend::{AdamW, Backend, Role};
use zhllama::backend::{AttnSaved, AttnShape, GemmShape, RmsNormSaved, RopeShape, RowShape};
use zhllama::ops;

#[test]
fn cpu_backend_memory_roundtrip() {
    let be = CpuBackend::new();
    let mut buf = be.alloc(5, Role::Activation).unwrap();
    assert_eq!(be.buf_len(&buf), 5);
    assert_eq!(buf, vec![0.0; 5], "alloc must zero-fill");
    be.upload(&mut buf, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let mut back = [0.0; 5];
    be.download(&buf, &mut back).unwrap();
    assert_eq!(back, [1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(be.view(&buf, 1..3), &[2.0, 3.0]);
    be.zero(be.view_mut(&mut buf, 3..5));
    assert_eq!(buf, vec![1.0, 2.0, 3.0, 0.0, 0.0]);
    let err = be.upload(&mut buf, &[1.0]).unwrap_err().to_string();
    assert!(
        err.contains("5") && err.contains("1"),
        "unhelpful error: {err}"
    );
    let mut ids = be.alloc_ids(2).unwrap();
    be.upload_ids(&mut ids, &[7, -100]).unwrap();
    assert_eq!(ids, vec![7, -100]);
    assert!(be.synchronize().is_ok());
}

#[test]
fn cpu_backend_calls_each_op_with_its_arguments_in_order() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(90);
    let (b, t, h, hkv, d) = (2, 5, 4, 2, 8);
    let (n, c, v) = (b * t, 16, 11);

    // matmul: a non-square, non-symmetric case with a beta blend.
    let (m, nn, k) = (3, 4, 5);
    let a = rng.vec(m * k, 1.0);
    let bm = rng.vec(nn * k, 1.0);
    let o0 = rng.vec(m * nn, 1.0);
    let (mut o1, mut o2) = (o0.clone(), o0.clone());
    be.matmul(&mut o1, &a, &bm, GemmShape::nt(m, nn, k), 0.5, 0.25);
    ops::matmul(&mut o2, &a, &bm, GemmShape::nt(m, nn, k), 0.5, 0.25);
    assert_eq!(o1, o2, "matmul");

    // elementwise
    let x = rng.vec(n * c, 1.0);
    let y0 = rng.vec(n * c, 1.0);
    let (mut y1, mut y2) = (y0.clone(), y0.clone());
    be.axpy(&mut y1, 0.3, &x);
    ops::axpy(&mut y2, 0.3, &x);
    assert_eq!(y1, y2, "axpy");
    be.scale(&mut y1, 1.7);
    ops::scale(&mut y2, 1.7);
    assert_eq!(y1, y2, "scale");
    be.copy(&mut y1, &x);
    assert_eq!(y1, x, "copy");
    assert_eq!(
        be.sum_squares(&x).unwrap(),
        ops::sum_squares(&x),
        "sum_squares"
    );

    // RMSNorm
    let w = rng.vec(c, 1.0);
    let (mut out1, mut r1, mut out2, mut r2) = (
        vec![0.0; n * c],
        vec![0.0; n],
        vec![0.0; n * c],
        vec![0.0; n],
    );
    be.rmsnorm_forward(&mut out1, &mut r1, &x, &w, RowShape { n, c }, 1e-5);
    ops::rmsnorm_forward(&mut out2, &mut r2, &x, &w, RowShape { n, c }, 1e-5);
    assert_eq!((&out1, &r1), (&out2, &r2), "rmsnorm_forward");
    let dout = rng.vec(n * c, 1.0);
    let dw0 = rng.vec(c, 1.0);
    let (mut dx1, mut dw1, mut dx2, mut dw2) = (y0.clone(), dw0.clone(), y0.clone(), dw0.clone());
    be.rmsnorm_backward(
        &mut dx1,
        &mut dw1,
        &dout,
        RmsNormSaved {
            x: &x,
            w: &w,
            rstd: &r1,
        },
        RowShape { n, c },
    );
    ops::rmsnorm_backward(
        &mut dx2,
        &mut dw2,
        &dout,
        RmsNormSaved {
            x: &x,
            w: &w,
            rstd: &r2,
        },
        RowShape { n, c },
    );
    assert_eq!((&dx1, &dw1), (&dx2, &dw2), "rmsnorm_backward");

    // RoPE
    let qx = rng.vec(b * t * h * d, 1.0);
    let rs = RopeShape {
        b,
        t,
        h,
        d,
        theta: 5000.0,
        pos_offset: 3,
    };
    let (mut q1, mut q2) = (qx.clone(), qx.clone());
    be.rope_forward(&mut q1, rs);
    ops::rope_forward(&mut q2, rs);
    assert_eq!(q1, q2, "rope_forward");
    be.rope_backward(&mut q1, rs);
    ops::rope_backward(&mut q2, rs);
    assert_eq!(q1, q2, "rope_backward");

    // attention
    let q = rng.vec(b * t * h * d, 1.0);
    let kk = rng.vec(b * t * hkv * d, 1.0);
    let vv = rng.vec(b * t * hkv * d, 1.0);
    let (mut ao1, mut l1, mut ao2, mut l2) = (
        vec![0.0; q.len()],
        vec![0.0; b * h * t],
        vec![0.0; q.len()],
        vec![0.0; b * h * t],
    );
    be.attention_forward(
        &mut ao1,
        &mut l1,
        &q,
        &kk,
        &vv,
        AttnShape { b, t, h, hkv, d },
    );
    ops::attention_forward(
        &mut ao2,
        &mut l2,
        &q,
        &kk,
        &vv,
        AttnShape { b, t, h, hkv, d },
    );
    assert_eq!((&ao1, &l1), (&ao2, &l2), "attention_forward");
    let dao = rng.vec(q.len(), 1.0);
    let mut g1 = (vec![0.0; q.len()], vec![0.0; kk.len()], vec![0.0; vv.len()]);
    let mut g2 = g1.clone();
    be.attention_backward(
        &mut g1.0,
        &mut g1.1,
        &mut g1.2,
        &dao,
        AttnSaved {
            q: &q,
            k: &kk,
            v: &vv,
            out: &ao1,
            lse: &l1,
        },
        AttnShape { b, t, h, hkv, d },
    );
    ops::attention_backward(
        &mut g2.0,
        &mut g2.1,
        &mut g2.2,
        &dao,
        AttnSaved {
            q: &q,
            k: &kk,
            v: &vv,
            out: &ao2,
            lse: &l2,
        },
        AttnShape { b, t, h, hkv, d },
    );
    assert_eq!(g1, g2, "attention_backward");

    // SwiGLU
    let gate = rng.vec(n * c, 3.0);
    let (mut s1, mut s2) = (vec![0.0; n * c], vec![0.0; n * c]);
    be.swiglu_forward(&mut s1, &gate, &x);
    ops::swiglu_forward(&mut s2, &gate, &x);
    assert_eq!(s1, s2, "swiglu_forward");
    let mut sg1 = (vec![0.0; n * c], vec![0.0; n * c]);
    let mut sg2 = sg1.clone();
    be.swiglu_backward(&mut sg1.0, &mut sg1.1, &dout, &gate, &x);
    ops::swiglu_backward(&mut sg2.0, &mut sg2.1, &dout, &gate, &x);
    assert_eq!(sg1, sg2, "swiglu_backward");

    // embedding
    let ids: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
    let table = rng.vec(v * c, 1.0);
    let (mut e1, mut e2) = (vec![0.0; n * c], vec![0.0; n * c]);
    be.embedding_forward(&mut e1, &ids, &table, n, c);
    ops::embedding_forward(&mut e2, &ids, &table, n, c);
    assert_eq!(e1, e2, "embedding_forward");
    let (mut dt1, mut dt2) = (table.clone(), table.clone());
    be.embedding_backward(&mut dt1, &dout, &ids, n, c);
    ops::embedding_backward(&mut dt2, &dout, &ids, n, c);
    assert_eq!(dt1, dt2, "embedding_backward");

    // cross-entropy
    let logits = rng.vec(n * v, 3.0);
    let mut targets: Vec<i32> = (0..n).map(|_| rng.below(v) as i32).collect();
    targets[1] = -100;
    let (mut ls1, mut ls2) = (vec![0.0; n], vec![0.0; n]);
    be.cross_entropy_forward(&mut ls1, &logits, &targets, n, v);
    ops::cross_entropy_forward(&mut ls2, &logits, &targets, n, v);
    assert_eq!(ls1, ls2, "cross_entropy_forward");
    let (mut dl1, mut dl2) = (vec![0.0; n * v], vec![0.0; n * v]);
    be.cross_entropy_backward(&mut dl1, &logits, &targets, n, v, 0.125);
    ops::cross_entropy_backward(&mut dl2, &logits, &targets, n, v, 0.125);
    assert_eq!(dl1, dl2, "cross_entropy_backward");

    // AdamW
    let hp = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
    };
    let p0 = rng.vec(n * c, 1.0);
    let m0 = rng.vec(n * c, 0.1);
    let v0: Vec<f32> = rng.vec(n * c, 0.1).iter().map(|x| x * x).collect();
    let mut s1 = (p0.clone(), m0.clone(), v0.clone());
    let mut s2 = (p0, m0, v0);
    be.adamw_step(&mut s1.0, &mut s1.1, &mut s1.2, &dout, hp);
    ops::adamw_step(&mut s2.0, &mut s2.1, &mut s2.2, &dout, hp);
    assert_eq!(s1, s2, "adamw_step");
}
