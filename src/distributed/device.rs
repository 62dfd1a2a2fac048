//! Collectives on backend buffers: what a device-resident optimizer step calls, for any backend
//! and any transport, without data crossing to the host.
//!
//! [`BufComm`] wraps a [`Comm`] and takes ranges of a backend's flat buffers:
//! - world 1: the reduce-scatter and the all-gather are copies ([`Backend::copy`]), which is what
//!   every transport computes at world 1 (nothing is added);
//! - a backend whose memory is host memory ([`Backend::host_floats`], the CPU backend): the
//!   transport's own collectives (`LocalComm`, `ThreadComm`, `MpiComm`) run on the buffers in
//!   place, so the canonical reduction order and bit-identity across world sizes are kept;
//! - the CUDA backend over `NcclComm` (feature `cuda`): NCCL's device collectives, queued on the
//!   communicator's stream after the work already queued on the backend's; [`BufComm::join`]
//!   makes the backend's stream wait for them before it reads a result.
//!
//! Anything else is a clear error rather than a silent trip through host memory. Knows flat
//! buffers, nothing of LLaMA.

use super::Comm;
use crate::backend::Backend;
#[cfg(not(feature = "cuda"))]
use anyhow::bail;
use anyhow::{Result, ensure};
use std::ops::Range;

#[derive(Clone, Copy)]
enum Op {
    ReduceScatter,
    AllGather,
}

/// Collectives over backend buffers on top of a [`Comm`] (see the module docs).
#[derive(Clone, Copy)]
pub struct BufComm<'a> {
    comm: &'a dyn Comm,
}

impl<'a> BufComm<'a> {
    pub fn new(comm: &'a dyn Comm) -> Self {
        BufComm { comm }
    }

    pub fn comm(&self) -> &'a dyn Comm {
        self.comm
    }

    /// `recv[recv_r] =` block `rank` of the element-wise sum over ranks of `send[send_r]`
    /// (`send_r.len() == recv_r.len() · world`; as [`Comm::reduce_scatter_sum`]).
    pub fn reduce_scatter_sum<B: Backend>(
        &self,
        be: &B,
        send: &B::Buf,
        send_r: Range<usize>,
        recv: &mut B::Buf,
        recv_r: Range<usize>,
    ) -> Result<()> {
        self.collective(Op::ReduceScatter, be, send, send_r, recv, recv_r)
    }

    /// `recv[recv_r] =` every rank's `send[send_r]` in rank order (`recv_r.len() ==
    /// send_r.len() · world`; as [`Comm::all_gather`]). `send` and `recv` are distinct buffers.
    pub fn all_gather<B: Backend>(
        &self,
        be: &B,
        send: &B::Buf,
        send_r: Range<usize>,
        recv: &mut B::Buf,
        recv_r: Range<usize>,
    ) -> Result<()> {
        self.collective(Op::AllGather, be, send, send_r, recv, recv_r)
    }

    /// The one dispatch of both collectives: the size rule, then world 1 (a copy), a host-memory
    /// backend (the transport's own collective in place), or the device transport.
    fn collective<B: Backend>(
        &self,
        op: Op,
        be: &B,
        send: &B::Buf,
        send_r: Range<usize>,
        recv: &mut B::Buf,
        recv_r: Range<usize>,
    ) -> Result<()> {
        let w = self.comm.world_size();
        let (big, small, name) = match op {
            Op::ReduceScatter => (send_r.len(), recv_r.len(), "reduce-scatter"),
            Op::AllGather => (recv_r.len(), send_r.len(), "all-gather"),
        };
        ensure!(
            big == small * w,
            "{name} over {w} ranks: send {} elements, receive {}",
            send_r.len(),
            recv_r.len()
        );
        if w == 1 {
            be.copy(be.view_mut(recv, recv_r), be.view(send, send_r));
            return Ok(());
        }
        if let Some(s) = be.host_floats(send) {
            let s = &s[send_r];
            let r = be
                .host_floats_mut(recv)
                .expect("a host-memory backend gives every buffer's floats");
            return match op {
                Op::ReduceScatter => self.comm.reduce_scatter_sum(s, &mut r[recv_r]),
                Op::AllGather => self.comm.all_gather(s, &mut r[recv_r]),
            };
        }
        match op {
            Op::ReduceScatter => {
                transport::reduce_scatter(self.comm, be, send, send_r, recv, recv_r)
            }
            Op::AllGather => transport::all_gather(self.comm, be, send, send_r, recv, recv_r),
        }
    }

    /// Make the backend's queue wait for every device collective queued so far (NCCL); a no-op
    /// for the transports whose collectives are complete when they return.
    pub fn join<B: Backend>(&self, be: &B) -> Result<()> {
        transport::join(self.comm, be)
    }
}

fn no_device_transport(comm: &dyn Comm, be_name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "no collective for {be_name} buffers over this transport at world {}: the CUDA backend \
         needs NCCL (NcclComm) beyond world 1",
        comm.world_size()
    )
}

#[cfg(feature = "cuda")]
mod transport {
    use super::*;
    use crate::backend::cuda::{CudaBackend, CudaBuf};
    use crate::distributed::nccl::NcclComm;
    use std::any::Any;

    fn parts<'b, B: Backend>(
        comm: &'b dyn Comm,
        be: &'b B,
    ) -> Result<(&'b NcclComm, &'b CudaBackend)> {
        let nccl = comm.as_any().and_then(|a| a.downcast_ref::<NcclComm>());
        let gpu = (be as &dyn Any).downcast_ref::<CudaBackend>();
        match (nccl, gpu) {
            (Some(n), Some(g)) => Ok((n, g)),
            _ => Err(no_device_transport(comm, &be.name())),
        }
    }

    fn cuda_buf<B: Backend>(b: &B::Buf) -> &CudaBuf {
        (b as &dyn Any)
            .downcast_ref::<CudaBuf>()
            .expect("the CUDA backend's buffers are CudaBufs")
    }

    fn cuda_buf_mut<B: Backend>(b: &mut B::Buf) -> &mut CudaBuf {
        (b as &mut dyn Any)
            .downcast_mut::<CudaBuf>()
            .expect("the CUDA backend's buffers are CudaBufs")
    }

    pub(super) fn reduce_scatter<B: Backend>(
        comm: &dyn Comm,
        be: &B,
        send: &B::Buf,
        send_r: Range<usize>,
        recv: &mut B::Buf,
        recv_r: Range<usize>,
    ) -> Result<()> {
        let (nccl, gpu) = parts(comm, be)?;
        let (s, r) = (cuda_buf::<B>(send), cuda_buf_mut::<B>(recv));
        nccl.reduce_scatter_device(gpu, gpu.view(s, send_r), gpu.view_mut(r, recv_r))
    }

    pub(super) fn all_gather<B: Backend>(
        comm: &dyn Comm,
        be: &B,
        send: &B::Buf,
        send_r: Range<usize>,
        recv: &mut B::Buf,
        recv_r: Range<usize>,
    ) -> Result<()> {
        let (nccl, gpu) = parts(comm, be)?;
        let (s, r) = (cuda_buf::<B>(send), cuda_buf_mut::<B>(recv));
        nccl.all_gather_device(gpu, gpu.view(s, send_r), gpu.view_mut(r, recv_r))
    }

    pub(super) fn join<B: Backend>(comm: &dyn Comm, be: &B) -> Result<()> {
        match parts(comm, be) {
            Ok((nccl, gpu)) => nccl.join(gpu),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod transport {
    use super::*;

    pub(super) fn reduce_scatter<B: Backend>(
        comm: &dyn Comm,
        be: &B,
        _send: &B::Buf,
        _send_r: Range<usize>,
        _recv: &mut B::Buf,
        _recv_r: Range<usize>,
    ) -> Result<()> {
        bail!(no_device_transport(comm, &be.name()))
    }

    pub(super) fn all_gather<B: Backend>(
        comm: &dyn Comm,
        be: &B,
        _send: &B::Buf,
        _send_r: Range<usize>,
        _recv: &mut B::Buf,
        _recv_r: Range<usize>,
    ) -> Result<()> {
        bail!(no_device_transport(comm, &be.name()))
    }

    pub(super) fn join<B: Backend>(_comm: &dyn Comm, _be: &B) -> Result<()> {
        Ok(())
    }
}
