//! Token embedding lookup.
//!
//! - forward:  `out[n,c] = table[ids[i], :]` (`=`).
//! - backward: `dtable[v,c] +=` the scatter-add of `dout[n,c]` rows into the rows `ids[i]`.
//!   Deterministic: tasks own disjoint column blocks of `dtable` and add rows in order `i = 0..n`,
//!   so the result does not depend on scheduling.
//!
//! Ids must lie in `0..v`; the caller validates user input, here an out-of-range id panics.

use super::math::SharedMut;
use rayon::prelude::*;

/// Columns per task in the backward.
const COL_BLOCK: usize = 64;

fn row_of(id: i32, v: usize) -> usize {
    assert!(
        id >= 0 && (id as usize) < v,
        "embedding: id {id} outside the table's {v} rows"
    );
    id as usize
}

/// `out[i, :] = table[ids[i], :]`.
pub fn embedding_forward(out: &mut [f32], ids: &[i32], table: &[f32], n: usize, c: usize) {
    assert_eq!(
        out.len(),
        n * c,
        "embedding_forward: out is not [n={n}, c={c}]"
    );
    assert_eq!(ids.len(), n, "embedding_forward: ids is not [n={n}]");
    assert!(
        c > 0 && table.len().is_multiple_of(c),
        "embedding_forward: table is not [v, c={c}]"
    );
    let v = table.len() / c;
    out.par_chunks_mut(c)
        .zip(ids.par_iter())
        .with_min_len(16)
        .for_each(|(o, &id)| {
            let r = row_of(id, v);
            o.copy_from_slice(&table[r * c..(r + 1) * c]);
        });
}

/// `dtable[ids[i], :] += dout[i, :]` for `i = 0..n`, in that order.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[i32], n: usize, c: usize) {
    assert_eq!(
        dout.len(),
        n * c,
        "embedding_backward: dout is not [n={n}, c={c}]"
    );
    assert_eq!(ids.len(), n, "embedding_backward: ids is not [n={n}]");
    assert!(
        c > 0 && dtable.len().is_multiple_of(c),
        "embedding_backward: dtable is not [v, c={c}]"
    );
    let v = dtable.len() / c;
    for &id in ids {
        row_of(id, v);
    }
    let dt = SharedMut::new(dtable);
    (0..c.div_ceil(COL_BLOCK)).into_par_iter().for_each(|cb| {
        let c0 = cb * COL_BLOCK;
        let w = COL_BLOCK.min(c - c0);
        for (i, &id) in ids.iter().enumerate() {
            // SAFETY: columns c0..c0+w of every row belong to this task only.
            let dst = unsafe { dt.slice(id as usize * c + c0, w) };
            for (d, &g) in dst.iter_mut().zip(&dout[i * c + c0..][..w]) {
                *d += g;
            }
        }
    });
}
