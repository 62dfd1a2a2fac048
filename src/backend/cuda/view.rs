//! Device views: a typed range of a [`CudaBuf`] passed to one op. A view carries its address,
//! element count and storage type; the launchers check the count against the op's shape and pick
//! a kernel variant from the type ([`super::launch`]).

use super::CudaBuf;
use super::launch::{Arg, Class, Io};
use crate::tensor::DType;
use std::marker::PhantomData;
use std::ops::Range;

/// A read-only range of a buffer.
#[derive(Clone, Copy)]
pub struct DView<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: DType,
    _p: PhantomData<&'a ()>,
}
/// A writable range of a buffer.
pub struct DViewMut<'a> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    pub(super) dtype: DType,
    _p: PhantomData<&'a mut ()>,
}

impl<'a> DView<'a> {
    /// A view of `len` elements of `dtype` at device address `ptr` (a live allocation the caller
    /// keeps alive for `'a`).
    pub(super) fn from_raw(ptr: u64, len: usize, dtype: DType) -> DView<'a> {
        DView {
            ptr,
            len,
            dtype,
            _p: PhantomData,
        }
    }
    /// Elements `range` of `buf`; panics when the range is outside the buffer.
    pub(super) fn of(buf: &'a CudaBuf, range: Range<usize>) -> DView<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {}",
            buf.len
        );
        Self::from_raw(
            buf.ptr + (range.start * buf.dtype.size()) as u64,
            range.len(),
            buf.dtype,
        )
    }
    /// Elements `off..off + len` of this view.
    pub(super) fn sub(self, off: usize, len: usize) -> DView<'a> {
        debug_assert!(off + len <= self.len, "sub-view out of range");
        Self::from_raw(self.ptr + (off * self.dtype.size()) as u64, len, self.dtype)
    }
    /// `(device address, elements, dtype)`; valid while the view's buffer lives.
    pub fn raw(&self) -> (u64, usize, DType) {
        (self.ptr, self.len, self.dtype)
    }
    /// This view as a kernel input named `what` that must hold `want` elements.
    pub(super) fn arg<'n>(&self, what: &'n str, want: usize) -> Arg<'n> {
        Arg {
            what,
            ptr: self.ptr,
            len: self.len,
            dtype: self.dtype,
            io: Io::In,
            want: Some(want),
            class: Class::Any,
        }
    }
}

impl<'a> DViewMut<'a> {
    /// A writable view of `len` elements of `dtype` at device address `ptr` (a live allocation the
    /// caller holds exclusively for `'a`).
    pub(super) fn from_raw(ptr: u64, len: usize, dtype: DType) -> DViewMut<'a> {
        DViewMut {
            ptr,
            len,
            dtype,
            _p: PhantomData,
        }
    }
    /// Elements `range` of `buf`; panics when the range is outside the buffer.
    pub(super) fn of(buf: &'a mut CudaBuf, range: Range<usize>) -> DViewMut<'a> {
        let v = DView::of(buf, range);
        Self::from_raw(v.ptr, v.len, v.dtype)
    }
    pub(super) fn ro(&self) -> DView<'_> {
        DView::from_raw(self.ptr, self.len, self.dtype)
    }
    /// Elements `off..off + len` of this view, borrowed for one call.
    pub(super) fn sub_mut(&mut self, off: usize, len: usize) -> DViewMut<'_> {
        debug_assert!(off + len <= self.len, "sub-view out of range");
        DViewMut::from_raw(self.ptr + (off * self.dtype.size()) as u64, len, self.dtype)
    }
    /// The whole view, borrowed for one call (a view is consumed by the op it is passed to).
    pub(super) fn reborrow(&mut self) -> DViewMut<'_> {
        self.sub_mut(0, self.len)
    }
    /// `(device address, elements, dtype)`; valid while the view's buffer lives.
    pub fn raw(&self) -> (u64, usize, DType) {
        (self.ptr, self.len, self.dtype)
    }
    /// This view as a kernel output named `what` (written, not read) of `want` elements.
    pub(super) fn out<'n>(&self, what: &'n str, want: usize) -> Arg<'n> {
        Arg {
            io: Io::Out,
            ..self.ro().arg(what, want)
        }
    }
    /// This view as a kernel argument named `what` that is read and written (`+=`), `want`
    /// elements.
    pub(super) fn inout<'n>(&self, what: &'n str, want: usize) -> Arg<'n> {
        Arg {
            io: Io::InOut,
            ..self.ro().arg(what, want)
        }
    }
}
