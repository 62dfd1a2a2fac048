//! Launch geometry of every kernel, one function per launch, grouped by op family. The CUDA
//! launchers take their grids from here, and so does the emulated kernel test
//! (`tests/cuda_emulated.rs`), so the geometry a kernel is checked under is the one it runs with.
//! Plain arithmetic: compiled in every build, with or without the `cuda` feature.

/// Grid (x, y, z), threads per block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

impl Launch {
    /// A one-dimensional grid of `x` blocks of `block` threads, no dynamic shared memory.
    pub const fn x(x: u32, block: u32) -> Launch {
        Launch {
            grid: (x, 1, 1),
            block,
            smem: 0,
        }
    }
    /// The grid as `usize`s.
    pub fn grid_usize(&self) -> (usize, usize, usize) {
        (
            self.grid.0 as usize,
            self.grid.1 as usize,
            self.grid.2 as usize,
        )
    }
}

/// Upper bound of the per-launch block counts below (x is clamped to 16 of these).
pub const GRID_CAP: u32 = 65535;

/// Blocks of `threads` covering `len` elements, at least 1, at most 16·[`GRID_CAP`].
pub fn blocks(len: usize, threads: u32) -> u32 {
    (len.div_ceil(threads as usize)).clamp(1, (GRID_CAP as usize) * 16) as u32
}

// ---- elementwise (kernels/elementwise.cu) -------------------------------------------------------
/// `copy_v1_*` (the conversion every staged launch uses): grid-stride over `len`.
pub fn cast(len: usize) -> Launch {
    Launch::x(blocks(len, 256).min(4096), 256)
}
/// A grid-stride elementwise kernel over `len` items (axpy, scale; fill, dropout and RoPE use
/// the same shape).
pub fn elementwise(len: usize) -> Launch {
    Launch::x(blocks(len, 256).min(8192), 256)
}
/// `sum_partial_v1_*` / `sum_squares_partial_v1_*`: one f64 partial per block, at most 8 per SM.
pub fn reduce_partial(len: usize, sm_count: u32) -> Launch {
    Launch::x(blocks(len, 256).min(sm_count.max(1) * 8), 256)
}
/// `sum_squares_finish_v1_f64`: one warp sums the partials in a fixed order.
pub fn reduce_finish() -> Launch {
    Launch::x(1, 32)
}

// ---- fill (kernels/fill.cu), dropout (kernels/dropout.cu), rope (kernels/rope.cu) --------------
/// `fill_uniform_v1_*` over `len` elements.
pub fn fill(len: usize) -> Launch {
    elementwise(len)
}
/// `dropout_v1_*` over `len` elements.
pub fn dropout(len: usize) -> Launch {
    elementwise(len)
}
/// `rope_{forward,backward}_v1_*`: one thread per rotated pair, `b·t·h·d/2` pairs.
pub fn rope(pairs: usize) -> Launch {
    elementwise(pairs)
}

// ---- swiglu (kernels/swiglu.cu) -----------------------------------------------------------------
/// `swiglu_*_v1_*` (`vec4`: four elements per thread) or `swiglu_*_x1_*` over `len` elements.
pub fn swiglu(len: usize, vec4: bool) -> Launch {
    elementwise(if vec4 { len / 4 } else { len })
}

// ---- rmsnorm (kernels/rmsnorm.cu) ---------------------------------------------------------------
/// `rmsnorm_forward_v1_*`: one block per row.
pub fn rmsnorm_forward(n: usize) -> Launch {
    Launch::x(n as u32, 256)
}
/// Blocks of `rmsnorm_backward_v1_*` (each writes one row of dw partials): two per SM at most.
pub fn rmsnorm_backward_blocks(n: usize, sm_count: u32) -> usize {
    n.min(2 * sm_count.max(1) as usize)
}
/// `rmsnorm_backward_v1_*` with `nblocks` = [`rmsnorm_backward_blocks`].
pub fn rmsnorm_backward(nblocks: usize) -> Launch {
    Launch::x(nblocks as u32, 256)
}
/// `rmsnorm_dw_reduce_v1_f32`: one thread per column of dw.
pub fn rmsnorm_dw_reduce(c: usize) -> Launch {
    Launch::x(c.div_ceil(256) as u32, 256)
}

// ---- attention (kernels/attention.cu) -----------------------------------------------------------
/// `attention_forward_v1_d*` and `attention_backward_dq_v1_d*`: a tile of 32 queries per block,
/// one block row per (batch, head).
pub fn attention_query_tiles(b: usize, t: usize, h: usize) -> Launch {
    Launch {
        grid: (t.div_ceil(32) as u32, (b * h) as u32, 1),
        block: 128,
        smem: 0,
    }
}
/// `attention_backward_dkdv_v1_d*`: a tile of 32 keys per block, one block row per (batch, kv
/// head).
pub fn attention_key_tiles(b: usize, t: usize, hkv: usize) -> Launch {
    Launch {
        grid: (t.div_ceil(32) as u32, (b * hkv) as u32, 1),
        block: 128,
        smem: 0,
    }
}
/// `attention_backward_delta_v1_*`: 8 rows (one per warp) per block over `b·t·h` rows.
pub fn attention_delta(rows: usize) -> Launch {
    Launch::x(rows.div_ceil(8) as u32, 256)
}

// ---- attention_cached (kernels/attention_cached.cu) ---------------------------------------------
/// `attention_cached_forward_v1_*`: one block per query row, the row's `past + tq` scores in
/// dynamic shared memory.
pub fn attention_cached(rows: usize, past: usize, tq: usize) -> Launch {
    Launch {
        grid: (rows as u32, 1, 1),
        block: 128,
        smem: ((past + tq) * 4) as u32,
    }
}

// ---- embedding (kernels/embedding.cu) -----------------------------------------------------------
/// `embedding_forward_v1_*`: one block per token.
pub fn embedding_forward(n: usize) -> Launch {
    Launch::x(n as u32, 256)
}
/// `embedding_backward_v1_*`: one block per distinct id (deterministic, no atomics).
pub fn embedding_backward(n_uniq: usize) -> Launch {
    Launch::x(n_uniq as u32, 256)
}

// ---- cross_entropy (kernels/cross_entropy.cu) ---------------------------------------------------
/// `cross_entropy_{forward,backward}_v1_*` and the fused lm_head chunk kernels: one block per row.
pub fn cross_entropy_rows(n: usize) -> Launch {
    Launch::x(n as u32, 256)
}
/// `lmhead_ce_finish_v1_f32`: one thread per row.
pub fn lm_head_ce_finish(n: usize) -> Launch {
    Launch::x(n.div_ceil(256) as u32, 256)
}

// ---- adamw (kernels/adamw.cu) -------------------------------------------------------------------
/// `adamw_step_v1_*`: grid-stride over `len`, at most 16 blocks per SM.
pub fn adamw(len: usize, sm_count: u32) -> Launch {
    Launch::x(blocks(len, 256).min(sm_count.max(1) * 16), 256)
}
