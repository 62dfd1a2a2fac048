//! N ranks as threads of one process, exchanging through shared memory. This is how the ZeRO-2
//! logic is tested by plain `cargo test` at world 2 and 3, and a fake a training loop can use to
//! test itself "distributed" without MPI. The sums are the shared ones in
//! [`super::collective`], so results are bit-identical to `MpiComm`'s.
//!
//! Failure: when a rank returns an error, panics or calls `abort`, every other rank's pending and
//! future collectives return an error naming it; a collective that waits longer than the timeout
//! fails too (so a test never hangs).

use super::collective::Transport;
use anyhow::{Result, anyhow, bail, ensure};
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct BarrierState {
    arrived: usize,
    generation: u64,
    failed: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    slots: Vec<Mutex<Vec<u8>>>,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl Shared {
    fn fail(&self, msg: String) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.failed.is_none() {
            s.failed = Some(msg);
        }
        self.cv.notify_all();
    }
}

/// One rank of an in-process world; see the module docs.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    sent: Cell<u64>,
}

impl ThreadComm {
    /// The `world` communicators of a new in-process world; collectives wait at most `timeout`.
    pub fn world(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        assert!(world >= 1, "a world has at least one rank");
        let shared = Arc::new(Shared {
            world,
            timeout,
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                failed: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
                sent: Cell::new(0),
            })
            .collect()
    }

    /// Run `f` on `world` threads, one per rank, and return each rank's result in rank order.
    /// A rank that fails (error or panic) makes the others' collectives fail instead of hang.
    pub fn run<T, F>(world: usize, timeout: Duration, f: F) -> Vec<Result<T>>
    where
        T: Send,
        F: Fn(ThreadComm) -> Result<T> + Sync,
    {
        let comms = ThreadComm::world(world, timeout);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let shared = c.shared.clone();
                        let rank = c.rank;
                        let guard = PanicGuard(&shared, rank);
                        let r = f(c);
                        std::mem::forget(guard);
                        if let Err(e) = &r {
                            shared.fail(format!("rank {rank} failed: {e:#}"));
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Err(anyhow!("rank {rank} panicked: {msg}"))
                    })
                })
                .collect()
        })
    }

    pub fn abort_job(&self, code: i32) -> ! {
        self.shared.fail(format!(
            "rank {} aborted the job with code {code}",
            self.rank
        ));
        panic!("rank {} aborted the job with code {code}", self.rank)
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent.get()
    }

    fn wait(&self) -> Result<()> {
        let sh = &*self.shared;
        let mut s = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &s.failed {
            bail!("rank {}: collective abandoned: {f}", self.rank);
        }
        s.arrived += 1;
        if s.arrived == sh.world {
            s.arrived = 0;
            s.generation += 1;
            sh.cv.notify_all();
            return Ok(());
        }
        let gen0 = s.generation;
        let start = Instant::now();
        loop {
            let left = sh.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let msg = format!(
                    "rank {} timed out after {:.0} s waiting for the other ranks",
                    self.rank,
                    sh.timeout.as_secs_f64()
                );
                s.failed.get_or_insert(msg.clone());
                sh.cv.notify_all();
                bail!("{msg}");
            }
            s = sh
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if s.generation != gen0 {
                return Ok(());
            }
            if let Some(f) = &s.failed {
                bail!("rank {}: collective abandoned: {f}", self.rank);
            }
        }
    }

    fn post(&self, bytes: &[u8]) {
        let mut slot = self.shared.slots[self.rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.clear();
        slot.extend_from_slice(bytes);
    }

    fn read(&self, from: usize, range: std::ops::Range<usize>, dst: &mut [u8]) -> Result<()> {
        let slot = self.shared.slots[from]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        ensure!(
            range.end <= slot.len(),
            "rank {} expected {} bytes from rank {from}, which sent {}: the ranks disagree on a \
             collective's size",
            self.rank,
            range.end,
            slot.len()
        );
        dst.copy_from_slice(&slot[range]);
        Ok(())
    }
}

struct PanicGuard<'a>(&'a Shared, usize);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        self.0.fail(format!("rank {} panicked", self.1));
    }
}

impl Transport for ThreadComm {
    fn t_rank(&self) -> usize {
        self.rank
    }
    fn t_world(&self) -> usize {
        self.shared.world
    }
    fn all_to_all(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let w = self.shared.world;
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(w),
            "all_to_all: {} bytes to send, {} to receive, world {w}",
            send.len(),
            recv.len()
        );
        let b = send.len() / w;
        self.post(send);
        self.wait()?;
        let r = (0..w).try_for_each(|i| {
            self.read(
                i,
                self.rank * b..(self.rank + 1) * b,
                &mut recv[i * b..(i + 1) * b],
            )
        });
        self.wait()?;
        r?;
        self.sent.set(self.sent.get() + ((w - 1) * b) as u64);
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let w = self.shared.world;
        let b = send.len();
        ensure!(
            recv.len() == b * w,
            "all_gather: {} bytes to receive for {b} sent, world {w}",
            recv.len()
        );
        self.post(send);
        self.wait()?;
        let r = (0..w).try_for_each(|i| self.read(i, 0..b, &mut recv[i * b..(i + 1) * b]));
        self.wait()?;
        r?;
        self.sent.set(self.sent.get() + ((w - 1) * b) as u64);
        Ok(())
    }
    fn broadcast_fixed(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let w = self.shared.world;
        if self.rank == root {
            self.post(buf);
        }
        self.wait()?;
        let r = if self.rank == root {
            Ok(())
        } else {
            self.read(root, 0..buf.len(), buf)
        };
        self.wait()?;
        r?;
        if self.rank == root {
            self.sent
                .set(self.sent.get() + ((w - 1) * buf.len()) as u64);
        }
        Ok(())
    }
    fn t_barrier(&self) -> Result<()> {
        self.wait()
    }
}

crate::impl_comm_via_transport!(ThreadComm);
