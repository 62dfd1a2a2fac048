//! NVTX ranges, so Nsight Systems / Nsight Compute attribute time to layers and ops.
//!
//! The NVTX v3 C implementation is compiled into the binary (the `nvtx-sys` crate, NVIDIA's own);
//! no NVTX library is needed at run time. On the first call it looks for a profiler the way every
//! NVTX v3 client does: `NVTX_INJECTION64_PATH` (set by `nsys profile` / `ncu` for the process they
//! launch) names an injection library, which is loaded and fills NVTX's function table. Without one
//! every call is one indirect call to an empty function: ~nothing, no allocation, no lock. A path that
//! does not load also leaves NVTX disabled; nothing here can fail or panic.
//!
//! Why not cudarc's `nvtx` module: it dlopens `libnvToolsExt`, which CUDA 12.9+/13 no longer ship
//! (NVTX v3 is header-only), and panics when the library is missing.

use std::ffi::c_char;

/// Longest name passed to NVTX, in bytes (longer names are cut at a character boundary).
pub const MAX_NAME: usize = 127;

/// `name` as a NUL-terminated byte string in a stack buffer: cut at the first NUL and at
/// [`MAX_NAME`] bytes (on a UTF-8 character boundary).
pub fn c_name(name: &str) -> [u8; MAX_NAME + 1] {
    let mut n = name.find('\0').unwrap_or(name.len()).min(MAX_NAME);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    let mut buf = [0u8; MAX_NAME + 1];
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

/// Open a range named `name` on the calling thread; ranges nest; close it with [`range_pop`] on the
/// same thread. A no-op without a profiler.
pub fn range_push(name: &str) {
    let buf = c_name(name);
    // SAFETY: `buf` is NUL-terminated and outlives the call (NVTX copies the message or the tool
    // reads it during the call).
    unsafe {
        nvtx_sys::ffi::nvtxRangePushA(buf.as_ptr() as *const c_char);
    }
}

/// Close the innermost range opened by [`range_push`] on this thread (NVTX ignores an unmatched pop).
pub fn range_pop() {
    // SAFETY: no arguments; NVTX checks its own state.
    unsafe {
        nvtx_sys::ffi::nvtxRangePop();
    }
}

/// A range that closes when dropped; inactive (no NVTX call at all) when created with `on = false`.
#[must_use = "the range closes when this guard is dropped"]
pub struct Range {
    on: bool,
}

impl Range {
    pub fn new(on: bool, name: &str) -> Self {
        if on {
            range_push(name);
        }
        Range { on }
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.on {
            range_pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C string handed to NVTX: cut at NUL, at the length limit on a character boundary, and
    /// always terminated.
    #[test]
    fn names_are_terminated_and_cut() {
        let b = c_name("rmsnorm_fwd");
        assert_eq!(&b[..12], b"rmsnorm_fwd\0");
        let b = c_name("a\0b");
        assert_eq!(&b[..2], b"a\0");
        let long = "x".repeat(500);
        let b = c_name(&long);
        assert!(b[..MAX_NAME].iter().all(|&c| c == b'x'));
        assert_eq!(b[MAX_NAME], 0);
        // 'é' is two bytes: 126 'x' + 'é' would end at byte 128, so it is dropped whole.
        let s = format!("{}é", "x".repeat(126));
        let b = c_name(&s);
        assert_eq!(b[126], 0);
        assert!(std::str::from_utf8(&b[..126]).is_ok());
    }
}
