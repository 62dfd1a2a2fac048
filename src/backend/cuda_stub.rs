//! Built without the `cuda` feature: the CUDA backend's constructors return a clear error, so callers
//! need no `cfg` of their own (candle's dummy-backend pattern). `CudaBackend` still implements
//! [`Backend`] so generic code (`run_on::<CudaBackend>`) compiles in both builds: its buffer and view
//! types are uninhabited, so no value of them (nor of the backend itself) can ever exist, and every
//! method body is an empty `match` on that impossibility.

use super::{
    AdamW, AttnSaved, AttnShape, Backend, CachedAttnShape, GemmShape, RmsNormSaved, Role,
    RopeShape, RowShape,
};
use anyhow::{Result, bail};
use std::ops::Range;
use std::path::PathBuf;

const NO_CUDA: &str = "zhllama was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`";

/// False: this build has no CUDA backend.
pub const ENABLED: bool = false;

/// No value of this type exists.
#[derive(Clone, Copy, Debug)]
pub enum Never {}

pub use super::cuda_options::{CudaOptions, Half, KernelTime, device_for_local_rank};

// The embedded kernel sources and launch geometry need no GPU library: tools and tests read them
// in every build.
#[path = "cuda/grid.rs"]
pub mod grid;
#[path = "cuda/kernels.rs"]
pub mod kernels;

/// Placeholder for the CUDA backend in builds without the `cuda` feature (never constructed).
pub struct CudaBackend {
    never: Never,
}

impl CudaBackend {
    /// Always fails: this binary was built without CUDA support.
    pub fn new(_device_ordinal: usize) -> Result<Self> {
        bail!(NO_CUDA)
    }
    /// Always fails: this binary was built without CUDA support.
    pub fn device_count() -> Result<usize> {
        bail!(NO_CUDA)
    }
    pub fn with_options(_opts: CudaOptions) -> Result<Self> {
        bail!(NO_CUDA)
    }
    pub fn arch(&self) -> &str {
        match self.never {}
    }
    pub fn device_name(&self) -> &str {
        match self.never {}
    }
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match self.never {}
    }
    pub fn mem_pool_release_threshold(&self) -> Result<u64> {
        match self.never {}
    }
    pub fn set_profiling(&self, _on: bool) {
        match self.never {}
    }
    pub fn profile_reset(&self) {
        match self.never {}
    }
    pub fn profile_report(&self) -> Result<Vec<KernelTime>> {
        match self.never {}
    }
    pub fn time_ms(&self, _f: impl FnOnce()) -> Result<f32> {
        match self.never {}
    }
}

impl Backend for CudaBackend {
    type Buf = Never;
    type Ids = Never;
    type View<'a> = Never;
    type ViewMut<'a> = Never;

    fn name(&self) -> String {
        match self.never {}
    }
    fn alloc(&self, _len: usize, _role: Role) -> Result<Never> {
        match self.never {}
    }
    fn alloc_ids(&self, _len: usize) -> Result<Never> {
        match self.never {}
    }
    fn buf_len(&self, _buf: &Never) -> usize {
        match self.never {}
    }
    fn upload(&self, _dst: &mut Never, _src: &[f32]) -> Result<()> {
        match self.never {}
    }
    fn download(&self, _src: &Never, _dst: &mut [f32]) -> Result<()> {
        match self.never {}
    }
    fn upload_ids(&self, _dst: &mut Never, _src: &[i32]) -> Result<()> {
        match self.never {}
    }
    fn view(&self, _buf: &Never, _range: Range<usize>) -> Never {
        match self.never {}
    }
    fn view_mut(&self, _buf: &mut Never, _range: Range<usize>) -> Never {
        match self.never {}
    }
    fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
    fn zero(&self, _out: Never) {
        match self.never {}
    }
    fn copy(&self, _out: Never, _x: Never) {
        match self.never {}
    }
    fn axpy(&self, _out: Never, _alpha: f32, _x: Never) {
        match self.never {}
    }
    fn scale(&self, _out: Never, _alpha: f32) {
        match self.never {}
    }
    fn fill_uniform(&self, _out: Never, _seed: u64, _lo: f32, _hi: f32) {
        match self.never {}
    }
    fn dropout(&self, _out: Never, _p: f32, _key: u64) {
        match self.never {}
    }
    fn sum_squares(&self, _x: Never) -> Result<f64> {
        match self.never {}
    }
    fn sum(&self, _x: Never) -> Result<f64> {
        match self.never {}
    }
    fn matmul(
        &self,
        _out: Never,
        _a: Never,
        _b: Never,
        _shape: GemmShape,
        _alpha: f32,
        _beta: f32,
    ) {
        match self.never {}
    }
    fn rmsnorm_forward(
        &self,
        _out: Never,
        _rstd: Never,
        _x: Never,
        _w: Never,
        _shape: RowShape,
        _eps: f32,
    ) {
        match self.never {}
    }
    fn rmsnorm_backward(
        &self,
        _dx: Never,
        _dw: Never,
        _dout: Never,
        _saved: RmsNormSaved<Never>,
        _shape: RowShape,
    ) {
        match self.never {}
    }
    fn rope_forward(&self, _x: Never, _shape: RopeShape) {
        match self.never {}
    }
    fn rope_backward(&self, _dx: Never, _shape: RopeShape) {
        match self.never {}
    }
    fn attention_forward(
        &self,
        _out: Never,
        _lse: Never,
        _q: Never,
        _k: Never,
        _v: Never,
        _shape: AttnShape,
    ) {
        match self.never {}
    }
    fn attention_backward(
        &self,
        _dq: Never,
        _dk: Never,
        _dv: Never,
        _dout: Never,
        _saved: AttnSaved<Never>,
        _shape: AttnShape,
    ) {
        match self.never {}
    }
    fn swiglu_forward(&self, _out: Never, _gate: Never, _up: Never) {
        match self.never {}
    }
    fn swiglu_backward(&self, _dgate: Never, _dup: Never, _dout: Never, _gate: Never, _up: Never) {
        match self.never {}
    }
    fn embedding_forward(&self, _out: Never, _ids: &Never, _table: Never, _n: usize, _c: usize) {
        match self.never {}
    }
    fn embedding_backward(&self, _dtable: Never, _dout: Never, _ids: &Never, _n: usize, _c: usize) {
        match self.never {}
    }
    fn cross_entropy_forward(
        &self,
        _losses: Never,
        _logits: Never,
        _targets: &Never,
        _n: usize,
        _v: usize,
    ) {
        match self.never {}
    }
    fn cross_entropy_backward(
        &self,
        _dlogits: Never,
        _logits: Never,
        _targets: &Never,
        _n: usize,
        _v: usize,
        _scale: f32,
    ) {
        match self.never {}
    }
    fn adamw_step(&self, _param: Never, _m: Never, _v: Never, _grad: Never, _hp: AdamW) {
        match self.never {}
    }
    fn attention_cached_forward(
        &self,
        _out: Never,
        _q: Never,
        _kcache: Never,
        _vcache: Never,
        _shape: CachedAttnShape,
    ) {
        match self.never {}
    }
    fn host_transfer_bytes(&self) -> u64 {
        match self.never {}
    }
    fn adamw_step_copy(
        &self,
        _param: Never,
        _m: Never,
        _v: Never,
        _grad: Never,
        _copy: Never,
        _hp: AdamW,
    ) {
        match self.never {}
    }
}

/// The NVRTC compile check's API, failing with the same error.
pub mod nvrtc {
    use super::kernels::KernelStats;
    use super::*;

    /// See the `cuda` build's `nvrtc::Compiled`.
    pub struct Compiled {
        pub file: String,
        pub arch: String,
        pub cubin: Vec<u8>,
        pub log: String,
        pub stats: Vec<KernelStats>,
        pub entry_points: Vec<String>,
    }
    pub fn ensure_present() -> Result<()> {
        bail!(NO_CUDA)
    }
    pub fn version() -> Result<(i32, i32)> {
        bail!(NO_CUDA)
    }
    pub fn compile(
        _file: &str,
        _arch: &str,
        _include: &[PathBuf],
        _verbose: bool,
    ) -> Result<Compiled> {
        bail!(NO_CUDA)
    }
    pub fn options(_arch: &str, _include_dirs: &[PathBuf], _verbose_ptxas: bool) -> Vec<String> {
        Vec::new()
    }
    pub fn entry_points(_cubin: &[u8]) -> Result<Vec<String>> {
        bail!(NO_CUDA)
    }
}

/// See the `cuda` build's `compile_all`.
pub type CompiledFile = (String, Vec<u8>, Vec<String>);
/// See the `cuda` build's `compile_all`.
pub fn compile_all(
    _arch: &str,
    _include_dirs: &[PathBuf],
    _cache_dir: Option<&std::path::Path>,
) -> Result<Vec<CompiledFile>> {
    bail!(NO_CUDA)
}
