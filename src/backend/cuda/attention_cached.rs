//! Inference attention over a KV cache (`kernels/attention_cached.cu`; CPU reference
//! `crate::ops::attention_cached`): one block per query row, the row's scores in dynamic shared
//! memory.

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, check_args, kargs, native};
use super::view::{DView, DViewMut};
use crate::backend::CachedAttnShape;
use anyhow::{Result, ensure};

impl CudaBackend {
    /// [`crate::backend::Backend::attention_cached_forward`].
    pub(super) fn attention_cached_forward_impl(
        &self,
        out: DViewMut<'_>,
        q: DView<'_>,
        kcache: DView<'_>,
        vcache: DView<'_>,
        shape: CachedAttnShape,
    ) -> Result<()> {
        let CachedAttnShape {
            b,
            tq,
            past,
            tmax,
            h,
            hkv,
            d,
        } = shape;
        ensure!(
            hkv > 0 && h.is_multiple_of(hkv) && past + tq <= tmax,
            "attention_cached_forward: bad shape h={h} hkv={hkv} past={past} tq={tq} tmax={tmax}"
        );
        let args = [
            out.out("out", b * tq * h * d).half(),
            q.arg("q", b * tq * h * d).half(),
            kcache.arg("kcache", b * tmax * hkv * d).half(),
            vcache.arg("vcache", b * tmax * hkv * d).half(),
        ];
        // Checked in the order q, out, kcache, vcache.
        check_args("attention_cached", &[args[1], args[0], args[2], args[3]])?;
        let rows = b * tq * h;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        // The row's scores live in dynamic shared memory, (past + tq) floats, next to the
        // kernel's static scratch; past 48 KiB in all the launch opts in to the device's limit.
        let at = grid::attention_cached(rows, past, tq);
        let scale = crate::ops::attention::attention_scale(d);
        self.dispatch(&args, native(&args, false), |sfx, p| {
            let name = format!("attention_cached_forward_v1_{sfx}");
            self.allow_dynamic_smem(&name, at.smem as usize)?;
            self.launch(
                &name,
                at,
                &kargs(
                    p,
                    &[
                        KArg::I(tq as i32),
                        KArg::I(past as i32),
                        KArg::I(tmax as i32),
                        KArg::I(h as i32),
                        KArg::I(hkv as i32),
                        KArg::I(d as i32),
                        KArg::F(scale),
                    ],
                ),
            )
        })
    }
}
