//! Small numerical building blocks shared by the ops: a dot product written so the compiler
//! vectorises it, and a handle for writing disjoint parts of one slice from several rayon tasks.

use std::marker::PhantomData;

/// Lanes of independent partial sums in [`dot`]: enough for the compiler to keep them in vector
/// registers (reassociation is explicit, so the result is deterministic).
const LANES: usize = 16;

/// `Σ a[i]·b[i]` in f32 with [`LANES`] partial sums added pairwise at the end.
#[inline]
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
#[inline]
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
#[inline]
pub fn axpy_slice(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Max of a non-empty slice (NaN-propagating like `torch.max`).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let cx = x.chunks_exact(LANES);
    let rx = cx.remainder();
    let mut nan = false;
    for c in cx {
        for l in 0..LANES {
            nan |= c[l].is_nan();
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, v) in rx.iter().enumerate() {
        nan |= v.is_nan();
        acc[l] = if *v > acc[l] { *v } else { acc[l] };
    }
    if nan {
        return f32::NAN;
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
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
