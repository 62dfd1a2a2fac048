//! Small numerical building blocks shared by the ops: a dot product and an `exp` written so the
//! compiler vectorises them, [`simd_fn!`] that compiles a kernel for AVX2 too and picks it when the
//! CPU has it, and a handle for writing disjoint parts of one slice from several rayon tasks.

use std::marker::PhantomData;

/// Lanes of independent partial sums in [`dot`]: enough for the compiler to keep them in vector
/// registers (reassociation is explicit, so the result is deterministic).
const LANES: usize = 16;

/// `Σ a[i]·b[i]` in f32 with [`LANES`] partial sums added pairwise at the end.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    reduce_lanes(acc)
}

/// Pairwise sum of the partial sums (fixed order).
#[inline(always)]
pub fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `y += alpha * x`.
#[inline(always)]
pub fn axpy_slice(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `out = exp(x − m)`; returns `Σ out` in [`LANES`] partial sums, added pairwise.
#[inline(always)]
pub fn exp_sub_sum_into(out: &mut [f32], x: &[f32], m: f32) -> f32 {
    assert_eq!(out.len(), x.len());
    let mut acc = [0.0f32; LANES];
    let mut oc = out.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (o, x) in (&mut oc).zip(&mut xc) {
        for l in 0..LANES {
            o[l] = exp_fast(x[l] - m);
            acc[l] += o[l];
        }
    }
    for (l, (o, &x)) in oc
        .into_remainder()
        .iter_mut()
        .zip(xc.remainder())
        .enumerate()
    {
        *o = exp_fast(x - m);
        acc[l] += *o;
    }
    reduce_lanes(acc)
}

/// `x ← exp(x − m)` in place; returns `Σ x` (after) in [`LANES`] partial sums, added pairwise.
#[inline(always)]
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact_mut(LANES);
    for c in &mut it {
        for l in 0..LANES {
            c[l] = exp_fast(c[l] - m);
            acc[l] += c[l];
        }
    }
    for (l, v) in it.into_remainder().iter_mut().enumerate() {
        *v = exp_fast(*v - m);
        acc[l] += *v;
    }
    reduce_lanes(acc)
}

/// Max of a slice (`-inf` when empty), in [`LANES`] lanes. NaNs are skipped; callers feed the
/// values on through `exp`, so a NaN still reaches their result.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let cx = x.chunks_exact(LANES);
    let rx = cx.remainder();
    for c in cx {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, &v) in rx.iter().enumerate() {
        acc[l] = if v > acc[l] { v } else { acc[l] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// A slice that several rayon tasks write at the same time, each to its own disjoint elements
/// (e.g. one attention head's rows of a `[b, t, h, d]` tensor). Reads and writes go through
/// [`SharedMut::slice`], whose caller promises disjointness.
pub struct SharedMut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the handle is only a pointer + length of a `&mut [f32]` borrowed for `'a`; tasks using it
// must touch disjoint elements (the contract of `slice`).
unsafe impl Send for SharedMut<'_> {}
unsafe impl Sync for SharedMut<'_> {}

impl<'a> SharedMut<'a> {
    pub fn new(s: &'a mut [f32]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `start..start + len`.
    ///
    /// # Safety
    /// No other live reference (from this handle or elsewhere) may overlap that range.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "SharedMut range out of bounds");
        // SAFETY: in bounds (checked above); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Defines a function whose body is compiled twice, for the baseline CPU and with AVX2 + FMA
/// enabled, and which picks the second when the CPU has those features (8-wide vectors instead of
/// 4). Rust never fuses `a * b + c` on its own, so both versions perform the same roundings in the
/// same order: the results are bit-identical, only the speed differs. Helpers the body calls must
/// be `#[inline(always)]` to be compiled into the fast version.
#[macro_export]
#[doc(hidden)]
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub use simd_fn;

/// `e^x` in f32 without branches or calls, so loops over it vectorise: Cody–Waite reduction
/// `x = n·ln2 + r` (`|r| ≤ ln2/2`), a degree-7 polynomial for `e^r`, and `2^n` built in the exponent
/// bits. Within 2 ulp of the exact value over the whole range (checked in `tests/ops_layers.rs`
/// against f64); `e^x = 0` below −103.97 (like libm) and inputs above 88 are clamped to `e^88`
/// (finite; every caller feeds `x ≤ 0` or uses the value in `1 / (1 + e^x)`). NaN gives NaN.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Taylor coefficients 1/k! (k = 2..7).
    const C2: f32 = 0.5;
    const C3: f32 = 1.0 / 6.0;
    const C4: f32 = 1.0 / 24.0;
    const C5: f32 = 1.0 / 120.0;
    const C6: f32 = 1.0 / 720.0;
    const C7: f32 = 1.0 / 5040.0;
    // Round-to-nearest by adding 1.5·2^23: n then sits in the low mantissa bits of `shifted`.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-103.97, 88.0);
    let shifted = xc * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = C6 + r * C7;
    let p = C5 + r * p;
    let p = C4 + r * p;
    let p = C3 + r * p;
    let p = C2 + r * p;
    let p = 1.0 + r * (1.0 + r * p);
    // 2^n in two halves so n down to −150 (subnormal results) stays representable.
    let n = shifted.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -103.97 { 0.0 } else { y }
}
