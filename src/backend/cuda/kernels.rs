//! The CUDA kernel sources embedded by build.rs (`kernels/*.cu`, `kernels/*.cuh`). Plain strings:
//! available in every build, so tools can compile-check them with NVRTC even without a GPU.

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The source of kernel file `name` (e.g. `"rmsnorm.cu"`), if embedded.
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES
        .iter()
        .chain(HEADERS.iter())
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}

use std::path::PathBuf;

/// One kernel's resource use, from the ptxas report (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// Parse ptxas's verbose report into one entry per kernel (entry function). Lines look like
/// `ptxas info : Compiling entry function 'k' for 'sm_90'`, `ptxas info : Function properties for k`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`, `ptxas info : Used N registers,
/// used N barriers, N bytes smem, ...`. A non-inlined device function gets its own `Function
/// properties for f` block (after some kernel's lines): its stack and spill line is not a kernel's.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelStats> {
    fn num_before(line: &str, key: &str) -> Option<u32> {
        let at = line.find(key)?;
        line[..at]
            .split([' ', ','])
            .rfind(|s| !s.is_empty())?
            .parse()
            .ok()
    }
    let mut out: Vec<KernelStats> = Vec::new();
    // True while the lines read belong to `out.last()` (not to a device function's block).
    let mut in_kernel = false;
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("");
            out.push(KernelStats {
                name,
                arch: arch.to_string(),
                ..Default::default()
            });
            in_kernel = true;
        } else if let Some(at) = line.find("Function properties for ") {
            let f = line[at + "Function properties for ".len()..].trim();
            in_kernel = out.last().is_some_and(|k| k.name == f);
        } else if let Some(k) = out.last_mut().filter(|_| in_kernel) {
            if line.contains("bytes stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
                k.smem_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Largest `gridDim.y` / `gridDim.z` a launch may use (CUDA's limit; `gridDim.x` may reach 2³¹ − 1).
pub const GRID_YZ_MAX: usize = 65535;

/// `Err` naming the kernel when `grid` exceeds CUDA's grid limits (x ≤ 2³¹ − 1, y and z ≤ 65535),
/// which the driver would otherwise report only as an opaque launch failure. Attention launches put
/// `b·h` in y, so e.g. 32 heads × a batch of 2048 sequences is refused here.
pub fn check_grid(name: &str, grid: (usize, usize, usize)) -> anyhow::Result<()> {
    let (x, y, z) = grid;
    anyhow::ensure!(
        (1..=i32::MAX as usize).contains(&x)
            && (1..=GRID_YZ_MAX).contains(&y)
            && (1..=GRID_YZ_MAX).contains(&z),
        "{name}: grid ({x}, {y}, {z}) outside CUDA's limits (x in 1..=2147483647, y and z in 1..=65535)"
    );
    Ok(())
}

/// Shared memory a launch may use without opting in (`cudaFuncSetAttribute` not called): 48 KiB,
/// static plus dynamic.
pub const SMEM_DEFAULT_LIMIT: usize = 48 * 1024;

/// How a launch with `dynamic` bytes of dynamic shared memory fits a kernel that declares `static_`
/// bytes of static shared memory: `Ok(None)` when static + dynamic ≤ 48 KiB (no attribute needed),
/// `Ok(Some(dynamic))` when it needs `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = dynamic`
/// and fits the device's opt-in limit `optin` (per block, static included), and `Err` naming
/// `what` when it does not fit at all.
pub fn dynamic_smem_plan(
    what: &str,
    dynamic: usize,
    static_: usize,
    optin: usize,
) -> anyhow::Result<Option<usize>> {
    let total = dynamic + static_;
    if total <= SMEM_DEFAULT_LIMIT {
        return Ok(None);
    }
    anyhow::ensure!(
        total <= optin,
        "{what}: needs {dynamic} B of dynamic + {static_} B of static shared memory, over the device's {optin} B per block"
    );
    Ok(Some(dynamic))
}

/// Directories that may hold the CUDA headers NVRTC needs (`cuda_bf16.h`), most specific first, kept
/// only where that header exists. `env` looks up an environment variable (the binary passes
/// `|k| std::env::var(k).ok()`; the library reads none itself): `ZHLLAMA_CUDA_INCLUDE`,
/// `CUDA_HOME`/`CUDA_PATH` (+ `/include`), the NVRTC wheel (`.../nvidia/cu13/lib` on
/// `LD_LIBRARY_PATH` → `.../nvidia/cu13/include`), then `/usr/local/cuda/include`.
pub fn cuda_include_dirs(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(d) = env("ZHLLAMA_CUDA_INCLUDE") {
        cands.push(d.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = env(var) {
            cands.push(PathBuf::from(d).join("include"));
        }
    }
    if let Some(paths) = env("LD_LIBRARY_PATH") {
        for p in paths.split(':').filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            if let Some(parent) = p.parent() {
                cands.push(parent.join("include"));
            }
        }
    }
    cands.push("/usr/local/cuda/include".into());
    let mut out: Vec<PathBuf> = Vec::new();
    for c in cands {
        if c.join("cuda_bf16.h").is_file() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The scalar coefficients of one AdamW step, computed in f64 exactly as `crate::ops::adamw_step`
/// does: [decay, w1, beta2, w2, eps, neg_step_size, bc2_sqrt].
pub fn adamw_coefficients(hp: crate::backend::AdamW) -> [f32; 7] {
    let widen = |x: f32| -> f64 { format!("{x}").parse().unwrap_or(x as f64) };
    let (lr, b1, b2, eps, wd) = (
        widen(hp.lr),
        widen(hp.beta1),
        widen(hp.beta2),
        widen(hp.eps),
        widen(hp.weight_decay),
    );
    let step = hp.step.max(1) as f64;
    let bc1 = 1.0 - b1.powf(step);
    let bc2 = 1.0 - b2.powf(step);
    [
        (1.0 - lr * wd) as f32,
        (1.0 - b1) as f32,
        b2 as f32,
        (1.0 - b2) as f32,
        eps as f32,
        (-(lr / bc1)) as f32,
        bc2.sqrt() as f32,
    ]
}

/// Host-side CSR grouping of positions by id: (unique ids ascending, offsets, positions ascending
/// within each id). Negative ids (ignored labels) are left out.
pub fn group_positions(ids: &[i32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32)
        .filter(|&i| ids[i as usize] >= 0)
        .collect();
    order.sort_by_key(|&i| ids[i as usize]); // stable: positions stay ascending within an id
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let id = ids[i as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as i32);
        }
    }
    offsets.push(order.len() as i32);
    (uniq, offsets, order)
}

#[cfg(test)]
mod tests {
    /// The embedded table is exactly the kernels/ directory of the checkout under test, file by
    /// file and byte for byte. A build script run against another (or a vanished) checkout embeds
    /// a different or empty table, and the CUDA backend then starts with kernels missing.
    #[test]
    fn embedded_sources_are_this_checkouts_kernels() {
        let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
        let dir = std::path::Path::new(&root).join("kernels");
        let mut on_disk: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        on_disk.sort();
        let mut embedded: Vec<(String, String)> = super::SOURCES
            .iter()
            .chain(super::HEADERS.iter())
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        embedded.sort();
        let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&embedded),
            names(&on_disk),
            "embedded kernel files differ from {}",
            dir.display()
        );
        for ((n, a), (_, b)) in embedded.iter().zip(&on_disk) {
            assert!(
                a == b,
                "embedded {n} differs from {}",
                dir.join(n).display()
            );
        }
        assert!(super::SOURCES.iter().any(|(n, _)| n.ends_with(".cu")));
    }
}
