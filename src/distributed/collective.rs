//! The reductions every transport shares: a transport only moves bytes ([`Transport`]); the sums
//! are done here in the canonical pairwise order, so results are bit-identical on every rank and
//! on every transport.

use anyhow::{Result, ensure};
use bytemuck::Pod;
use std::ops::AddAssign;

/// Byte movement between the ranks of a job. Blocks are equal-sized; block `j` of a buffer of
/// `world·b` bytes is `[j·b, (j+1)·b)`.
pub trait Transport {
    fn t_rank(&self) -> usize;
    fn t_world(&self) -> usize;
    /// Block `j` of `send` goes to rank `j`; block `i` of `recv` = block `rank` of rank `i`'s send.
    fn all_to_all(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// Block `i` of `recv` = rank `i`'s `send`.
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// `buf =` root's `buf` (same length everywhere).
    fn broadcast_fixed(&self, buf: &mut [u8], root: usize) -> Result<()>;
    fn t_barrier(&self) -> Result<()>;
}

/// The split point of the canonical pairwise tree over `n ≥ 2` leaves: the largest power of two
/// strictly below `n`.
pub fn tree_split(n: usize) -> usize {
    debug_assert!(n >= 2);
    let p = n.next_power_of_two();
    if p == n { n / 2 } else { p / 2 }
}

/// `blocks[0..n] =` the canonical pairwise-tree sum of the `count` equal blocks of `blocks`
/// (the other blocks are scratch afterwards).
pub fn tree_sum_blocks<T: Copy + AddAssign>(blocks: &mut [T], count: usize) {
    if count <= 1 {
        return;
    }
    let n = blocks.len() / count;
    debug_assert_eq!(n * count, blocks.len());
    rec(blocks, n, 0, count);
    fn rec<T: Copy + AddAssign>(b: &mut [T], n: usize, lo: usize, hi: usize) {
        if hi - lo <= 1 {
            return;
        }
        let h = tree_split(hi - lo);
        rec(b, n, lo, lo + h);
        rec(b, n, lo + h, hi);
        let (left, right) = b.split_at_mut((lo + h) * n);
        for (l, r) in left[lo * n..(lo + 1) * n].iter_mut().zip(&right[..n]) {
            *l += *r;
        }
    }
}

/// Reduce-scatter through `all_to_all`, summed in canonical order.
pub fn reduce_scatter<T, E>(t: &T, send: &[E], recv: &mut [E]) -> Result<()>
where
    T: Transport + ?Sized,
    E: Pod + AddAssign,
{
    let world = t.t_world();
    let n = recv.len();
    ensure!(
        send.len() == n * world,
        "reduce_scatter: send has {} elements, expected recv ({n}) × world ({world})",
        send.len()
    );
    if world == 1 {
        recv.copy_from_slice(send);
        return Ok(());
    }
    let mut blocks = vec![E::zeroed(); send.len()];
    t.all_to_all(
        bytemuck::cast_slice(send),
        bytemuck::cast_slice_mut(&mut blocks),
    )?;
    tree_sum_blocks(&mut blocks, world);
    recv.copy_from_slice(&blocks[..n]);
    Ok(())
}

/// All-reduce = reduce-scatter of the (padded) buffer, then all-gather: same bits on every rank.
pub fn all_reduce<T, E>(t: &T, buf: &mut [E]) -> Result<()>
where
    T: Transport + ?Sized,
    E: Pod + AddAssign,
{
    let world = t.t_world();
    if world == 1 || buf.is_empty() {
        return Ok(());
    }
    let chunk = buf.len().div_ceil(world);
    let mut padded = vec![E::zeroed(); chunk * world];
    padded[..buf.len()].copy_from_slice(buf);
    let mut mine = vec![E::zeroed(); chunk];
    reduce_scatter(t, &padded, &mut mine)?;
    t.all_gather_bytes(
        bytemuck::cast_slice(&mine),
        bytemuck::cast_slice_mut(&mut padded),
    )?;
    buf.copy_from_slice(&padded[..buf.len()]);
    Ok(())
}

/// All-gather of typed elements.
pub fn all_gather<T, E>(t: &T, send: &[E], recv: &mut [E]) -> Result<()>
where
    T: Transport + ?Sized,
    E: Pod,
{
    let world = t.t_world();
    ensure!(
        recv.len() == send.len() * world,
        "all_gather: recv has {} elements, expected send ({}) × world ({world})",
        recv.len(),
        send.len()
    );
    if world == 1 {
        recv.copy_from_slice(send);
        return Ok(());
    }
    t.all_gather_bytes(bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv))
}

/// Broadcast of a variable-length byte buffer: the length first, then the bytes.
pub fn broadcast_vec<T: Transport + ?Sized>(t: &T, buf: &mut Vec<u8>, root: usize) -> Result<()> {
    let world = t.t_world();
    ensure!(
        root < world,
        "broadcast: root {root} is not a rank of a world of {world}"
    );
    if world == 1 {
        return Ok(());
    }
    let mut len = (buf.len() as u64).to_le_bytes();
    t.broadcast_fixed(&mut len, root)?;
    buf.resize(u64::from_le_bytes(len) as usize, 0);
    t.broadcast_fixed(buf, root)
}

/// Implements [`super::Comm`]'s collectives for a [`Transport`] type with `rank`, `world`,
/// `abort` and `bytes_sent` supplied by the caller.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_comm_via_transport {
    ($ty:ty) => {
        impl $crate::distributed::Comm for $ty {
            fn rank(&self) -> usize {
                $crate::distributed::collective::Transport::t_rank(self)
            }
            fn world_size(&self) -> usize {
                $crate::distributed::collective::Transport::t_world(self)
            }
            fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
                $crate::distributed::collective::all_reduce(self, buf)
            }
            fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()> {
                $crate::distributed::collective::all_reduce(self, buf)
            }
            fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()> {
                $crate::distributed::collective::reduce_scatter(self, send, recv)
            }
            fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()> {
                $crate::distributed::collective::all_gather(self, send, recv)
            }
            fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> anyhow::Result<()> {
                $crate::distributed::collective::broadcast_vec(self, buf, root)
            }
            fn barrier(&self) -> anyhow::Result<()> {
                $crate::distributed::collective::Transport::t_barrier(self)
            }
            fn abort(&self, code: i32) -> ! {
                self.abort_job(code)
            }
            fn bytes_sent(&self) -> u64 {
                self.sent_bytes()
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree's shape, written out by hand for small n.
    #[test]
    fn split_points() {
        let cases = [
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 4),
            (6, 4),
            (7, 4),
            (8, 4),
            (9, 8),
            (12, 8),
        ];
        for (n, h) in cases {
            assert_eq!(tree_split(n), h, "n = {n}");
        }
    }

    /// Blocks summed in the tree order: compare with the association written out by hand.
    #[test]
    fn tree_sum_matches_hand_written_association() {
        let v: Vec<f32> = vec![1e8, 1.0, -1e8, 1.0, 3.0, 0.5];
        // n = 3: (v0 + v1) + v2
        let mut b = v[..3].to_vec();
        tree_sum_blocks(&mut b, 3);
        assert_eq!(b[0].to_bits(), ((v[0] + v[1]) + v[2]).to_bits());
        // n = 6: ((v0 + v1) + (v2 + v3)) + (v4 + v5)
        let mut b = v.clone();
        tree_sum_blocks(&mut b, 6);
        assert_eq!(
            b[0].to_bits(),
            (((v[0] + v[1]) + (v[2] + v[3])) + (v[4] + v[5])).to_bits()
        );
        // n = 5: ((v0 + v1) + (v2 + v3)) + v4
        let mut b = v[..5].to_vec();
        tree_sum_blocks(&mut b, 5);
        assert_eq!(
            b[0].to_bits(),
            (((v[0] + v[1]) + (v[2] + v[3])) + v[4]).to_bits()
        );
    }
}
