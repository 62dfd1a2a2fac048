//! Rank, local rank and world size from the launcher's environment. The binary passes its
//! environment in as a map (only binaries read environment variables).
//!
//! | launcher | rank | local rank | world size |
//! |---|---|---|---|
//! | OpenMPI `mpirun` | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_LOCAL_RANK` | `OMPI_COMM_WORLD_SIZE` |
//! | MPICH / Intel MPI (PMI) | `PMI_RANK` | `MPI_LOCALRANKID`, else `PMI_LOCAL_RANK` | `PMI_SIZE` |
//! | Slurm `srun` | `SLURM_PROCID` | `SLURM_LOCALID` | `SLURM_NTASKS` |
//!
//! The first launcher whose rank variable is present wins, in the table's order (an `mpirun`
//! inside a Slurm allocation sets both; its own variables describe the job).

use anyhow::{Context, Result, bail};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    OpenMpi,
    Pmi,
    Slurm,
}

/// Where this process sits in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub rank: usize,
    /// Rank among the processes on this node (picks the GPU).
    pub local_rank: usize,
    pub world_size: usize,
    pub launcher: Launcher,
}

/// The launch described by `vars`, or `None` when no launcher's variables are present (a plain
/// single-process run). Errors name the variable that is malformed or missing.
pub fn launch_info(vars: &HashMap<String, String>) -> Result<Option<LaunchInfo>> {
    type Spec = (
        Launcher,
        &'static str,
        &'static [&'static str],
        &'static str,
    );
    const SPECS: [Spec; 3] = [
        (
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            &["OMPI_COMM_WORLD_LOCAL_RANK"],
            "OMPI_COMM_WORLD_SIZE",
        ),
        (
            Launcher::Pmi,
            "PMI_RANK",
            &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
            "PMI_SIZE",
        ),
        (
            Launcher::Slurm,
            "SLURM_PROCID",
            &["SLURM_LOCALID"],
            "SLURM_NTASKS",
        ),
    ];
    for (launcher, rank_var, local_vars, size_var) in SPECS {
        if !vars.contains_key(rank_var) {
            continue;
        }
        let rank = parse(vars, rank_var)?;
        let world_size = parse(vars, size_var)?;
        let local_var = local_vars
            .iter()
            .find(|v| vars.contains_key(**v))
            .with_context(|| {
                format!(
                    "{rank_var} is set but none of {} is: cannot tell the local rank",
                    local_vars.join(", ")
                )
            })?;
        let local_rank = parse(vars, local_var)?;
        if world_size == 0 {
            bail!("{size_var}=0: a job has at least one rank");
        }
        if rank >= world_size {
            bail!("{rank_var}={rank} is not below {size_var}={world_size}");
        }
        return Ok(Some(LaunchInfo {
            rank,
            local_rank,
            world_size,
            launcher,
        }));
    }
    Ok(None)
}

fn parse(vars: &HashMap<String, String>, name: &str) -> Result<usize> {
    let v = vars
        .get(name)
        .with_context(|| format!("environment variable {name} is not set"))?;
    v.trim()
        .parse()
        .with_context(|| format!("environment variable {name}={v:?} is not a non-negative integer"))
}
