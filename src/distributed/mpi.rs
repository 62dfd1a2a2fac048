//! The MPI transport (feature `mpi`): the system OpenMPI (or any MPI) through the `mpi` crate.
//! Byte movement only — `MPI_Alltoall`, `MPI_Allgather`, `MPI_Bcast`, `MPI_Barrier`; the sums are
//! the shared ones in [`super::collective`].
//!
//! Failure: a rank that returns an error should print it and call `abort` (`MPI_Abort` ends every
//! rank). A rank that dies is noticed by `mpirun`/`srun`, which end the others. The optional
//! watchdog covers the remaining case, a rank that hangs: a collective waiting longer than the
//! limit prints which one and ends this process (`mpirun` then ends the job). Barriers get ten
//! times the limit: they are where ranks legitimately wait for rank 0's file work (verifying a
//! checkpoint, writing the final model).

use super::collective::Transport;
use anyhow::{Result, bail, ensure};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Busy = Option<(Instant, &'static str, Duration)>;

/// One rank of an MPI job (`MPI_COMM_WORLD`). Dropping it finalizes MPI.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    sent: Cell<u64>,
    /// `(since, what, limit)` of the collective in progress, for the watchdog.
    busy: Arc<Mutex<Busy>>,
    limit: Duration,
    // Declared last: dropped (MPI_Finalize) after the communicator.
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED, so MPI calls may come from any thread as
// long as they are not concurrent; `MpiComm` is `!Sync` (Cell), so only one thread uses it at a
// time. The watchdog thread never calls MPI.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialize MPI (once per process). See the module docs for `watchdog`.
    pub fn init(watchdog: Option<Duration>) -> Result<Self> {
        let Some((universe, threading)) =
            mpi::initialize_with_threading(mpi::Threading::Serialized)
        else {
            bail!("MPI is already initialized in this process");
        };
        ensure!(
            threading >= mpi::Threading::Serialized,
            "this MPI provides thread level {threading:?}, zhllama needs Serialized"
        );
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let busy: Arc<Mutex<Busy>> = Arc::new(Mutex::new(None));
        if let Some(limit) = watchdog {
            let busy = busy.clone();
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(500).min(limit));
                    let b = *busy.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((since, what, limit)) = b
                        && since.elapsed() > limit
                    {
                        eprintln!(
                            "error: rank {rank} of {size}: {what} has waited {:.0} s for the \
                             other ranks (limit {:.0} s); a rank has probably died or hung — \
                             ending this process",
                            since.elapsed().as_secs_f64(),
                            limit.as_secs_f64()
                        );
                        std::process::abort();
                    }
                }
            });
        }
        Ok(MpiComm {
            world,
            rank,
            size,
            sent: Cell::new(0),
            busy,
            limit: watchdog.unwrap_or(Duration::MAX),
            _universe: universe,
        })
    }

    pub fn abort_job(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent.get()
    }

    fn guarded<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        let limit = if what == "barrier" {
            self.limit.saturating_mul(10)
        } else {
            self.limit
        };
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what, limit));
        let r = f();
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    }

    fn count(&self, bytes: usize, what: &str) -> Result<()> {
        ensure!(
            bytes <= i32::MAX as usize,
            "{what}: {bytes} bytes in one MPI call exceeds MPI's int count; use smaller buckets"
        );
        Ok(())
    }
}

impl Transport for MpiComm {
    fn t_rank(&self) -> usize {
        self.rank
    }
    fn t_world(&self) -> usize {
        self.size
    }
    fn all_to_all(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(self.size),
            "all_to_all: {} bytes to send, {} to receive, world {}",
            send.len(),
            recv.len(),
            self.size
        );
        self.count(send.len(), "all_to_all")?;
        self.guarded("all-to-all (reduce-scatter)", || {
            self.world.all_to_all_into(send, recv)
        });
        let b = send.len() / self.size;
        self.sent
            .set(self.sent.get() + ((self.size - 1) * b) as u64);
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(
            recv.len() == send.len() * self.size,
            "all_gather: {} bytes to receive for {} sent, world {}",
            recv.len(),
            send.len(),
            self.size
        );
        self.count(recv.len(), "all_gather")?;
        self.guarded("all-gather", || self.world.all_gather_into(send, recv));
        self.sent
            .set(self.sent.get() + ((self.size - 1) * send.len()) as u64);
        Ok(())
    }
    fn broadcast_fixed(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.count(buf.len(), "broadcast")?;
        self.guarded("broadcast", || {
            self.world
                .process_at_rank(root as i32)
                .broadcast_into(&mut *buf)
        });
        if self.rank == root {
            self.sent
                .set(self.sent.get() + ((self.size - 1) * buf.len()) as u64);
        }
        Ok(())
    }
    fn t_barrier(&self) -> Result<()> {
        self.guarded("barrier", || self.world.barrier());
        Ok(())
    }
}

crate::impl_comm_via_transport!(MpiComm);
