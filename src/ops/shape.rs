//! The shapes the ops take, one small `Copy` struct per op family, and the groups of tensors a
//! backward re-reads from its forward. Sizes follow the naming of `backend/mod.rs`: `n` rows,
//! `c` channels, `b` batch, `t` sequence, `h` query heads, `hkv` key/value heads, `d` head dim,
//! `v` vocabulary.

/// A product `out[m,n] = op(a)[m,k] · op(b)[k,n]`; `trans_a`/`trans_b`: that operand is stored
/// transposed (`a` as `[k,m]`, `b` as `[n,k]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmShape {
    /// `a[m,k] · b[k,n]`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, false, false)
    }
    /// `a[m,k] · b[n,k]ᵀ` (the layout of an HF `Linear` weight `[out, in]`).
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, false, true)
    }
    /// `a[k,m]ᵀ · b[k,n]` (a weight gradient from activations).
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, true, false)
    }
    /// `a[k,m]ᵀ · b[n,k]ᵀ`.
    pub fn tt(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, true, true)
    }
    /// Any combination of transposes.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Self {
            m,
            n,
            k,
            trans_a,
            trans_b,
        }
    }
}

/// `n` rows of `c` channels (RMSNorm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    pub n: usize,
    pub c: usize,
}

/// Rotary embedding of `x[b,t,h,d]` with base `theta`, token `ti` at position `pos_offset + ti`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
    pub theta: f32,
    pub pos_offset: usize,
}

/// Causal grouped-query attention: `q[b,t,h,d]`, `k`/`v[b,t,hkv,d]`, `lse[b,h,t]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

impl AttnShape {
    /// This attention with RoPE (base `theta`, first position `pos_offset`) applied to q and k.
    pub fn with_rope(self, theta: f32, pos_offset: usize) -> AttnRopeShape {
        AttnRopeShape {
            attn: self,
            theta,
            pos_offset,
        }
    }
    /// Elements of `q` (and of `out`): `b·t·h·d`.
    pub fn q_len(&self) -> usize {
        self.b * self.t * self.h * self.d
    }
    /// Elements of `k` (and of `v`): `b·t·hkv·d`.
    pub fn kv_len(&self) -> usize {
        self.b * self.t * self.hkv * self.d
    }
}

/// [`AttnShape`] of the fused ops that rotate q and k by RoPE (base `theta`, positions
/// `pos_offset + ti`) before attending.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnRopeShape {
    pub attn: AttnShape,
    pub theta: f32,
    pub pos_offset: usize,
}

impl AttnRopeShape {
    /// The rotation of `q[b,t,h,d]`.
    pub fn rope_q(&self) -> RopeShape {
        self.rope(self.attn.h)
    }
    /// The rotation of `k[b,t,hkv,d]`.
    pub fn rope_k(&self) -> RopeShape {
        self.rope(self.attn.hkv)
    }
    fn rope(&self, h: usize) -> RopeShape {
        let AttnShape { b, t, d, .. } = self.attn;
        RopeShape {
            b,
            t,
            h,
            d,
            theta: self.theta,
            pos_offset: self.pos_offset,
        }
    }
}

/// Attention of `tq` new queries `q[b,tq,h,d]` over a key/value cache `[b,tmax,hkv,d]` that holds
/// positions `0..past+tq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedAttnShape {
    pub b: usize,
    pub tq: usize,
    pub past: usize,
    pub tmax: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

/// The lm_head + cross-entropy: `x[n,c]`, `w[v,c]`, logits `[n,v]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmHeadShape {
    pub n: usize,
    pub c: usize,
    pub v: usize,
}

/// What an RMSNorm backward re-reads: the forward's input `x[n,c]`, weight `w[c]` and saved
/// `rstd[n]`.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormSaved<V> {
    pub x: V,
    pub w: V,
    pub rstd: V,
}

/// What an attention backward re-reads: the forward's `q`, `k`, `v`, its output `out` and saved
/// `lse`.
#[derive(Clone, Copy, Debug)]
pub struct AttnSaved<V> {
    pub q: V,
    pub k: V,
    pub v: V,
    pub out: V,
    pub lse: V,
}
