//! Rotary embedding in place (`kernels/rope.cu`; CPU reference `crate::ops::rope`), and the
//! frequency table that the RoPE and attention kernels read.

use super::CudaBackend;
use super::grid;
use super::launch::{KArg, check_view, suffix};
use super::view::DViewMut;
use crate::backend::RopeShape;
use anyhow::{Result, anyhow, ensure};
use cudarc::driver::DevicePtr;

/// Which rotation [`CudaBackend::rope_impl`] applies.
#[derive(Clone, Copy)]
pub(super) enum Dir {
    /// By +angle (`rope_forward`).
    Forward,
    /// By −angle, the transpose (`rope_backward`).
    Backward,
}

impl CudaBackend {
    /// The device table `inv_freq[i] = theta^(−2i/d)`, `i < d/2` (`ops::rope::inv_freq`: correctly
    /// rounded, as the CPU backend uses), uploaded once per (theta, d) and kept; `0` (a null
    /// pointer: no RoPE) for `theta = 0`. The kernels take the table rather than computing the
    /// frequencies with CUDA's `powf`, which is not correctly rounded.
    pub(super) fn rope_inv_freq(&self, theta: f32, d: usize) -> Result<u64> {
        if theta == 0.0 {
            return Ok(0);
        }
        ensure!(
            theta.is_finite() && theta > 0.0,
            "rope: theta {theta} is not a positive number"
        );
        let slot = format!("rope_inv_freq_{:08x}_d{d}", theta.to_bits());
        let mut s = self.scratch.lock().unwrap();
        if !s.contains_key(&slot) {
            let bytes: Vec<u8> = (0..d / 2)
                .flat_map(|i| crate::ops::rope::inv_freq(theta, d, i).to_le_bytes())
                .collect();
            let mem = self
                .stream
                .clone_htod(&bytes)
                .map_err(|e| anyhow!("uploading the RoPE frequency table: {e:?}"))?;
            s.insert(slot.clone(), mem);
        }
        let (p, _g) = s[&slot].device_ptr(&self.stream);
        Ok(p)
    }

    /// [`crate::backend::Backend::rope_forward`] / [`crate::backend::Backend::rope_backward`].
    pub(super) fn rope_impl(&self, x: DViewMut<'_>, shape: RopeShape, dir: Dir) -> Result<()> {
        let RopeShape {
            b,
            t,
            h,
            d,
            theta,
            pos_offset,
        } = shape;
        ensure!(d.is_multiple_of(2), "rope: head dim {d} is odd");
        check_view("rope x", x.len, b * t * h * d)?;
        let pairs = b * t * h * d / 2;
        if pairs == 0 {
            return Ok(());
        }
        ensure!(theta > 0.0, "rope: theta {theta} must be positive");
        let inv_freq = self.rope_inv_freq(theta, d)?;
        let dir = match dir {
            Dir::Forward => "forward",
            Dir::Backward => "backward",
        };
        self.launch(
            &format!("rope_{dir}_v1_{}", suffix(x.dtype)),
            grid::rope(pairs),
            &[
                KArg::P(x.ptr),
                KArg::I(b as i32),
                KArg::I(t as i32),
                KArg::I(h as i32),
                KArg::I(d as i32),
                KArg::P(inv_freq),
                KArg::I(pos_offset as i32),
            ],
        )
    }
}
