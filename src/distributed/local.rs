//! The single-process communicator: world size 1, every collective is a copy, nothing is sent.

use super::Comm;
use anyhow::{Result, ensure};

/// World of one rank (rank 0). Collectives are copies; `bytes_sent` stays 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalComm;

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(
            send.len() == recv.len(),
            "reduce_scatter: send has {} elements, recv {} (world 1)",
            send.len(),
            recv.len()
        );
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(
            send.len() == recv.len(),
            "all_gather: send has {} elements, recv {} (world 1)",
            send.len(),
            recv.len()
        );
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        ensure!(
            root == 0,
            "broadcast: root {root} is not a rank of a world of 1"
        );
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
}
