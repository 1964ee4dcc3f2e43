//! The backend on a GPU: block pools in device memory and the kernels of `kernels/`,
//! compiled with NVRTC for the device when it is opened.
//!
//! Everything CUDA goes through candle's device (`candle_core::cuda_backend`) and its
//! re-exported cudarc, so this crate never links a second cudarc. Kernels are launched on
//! candle's stream, so they are ordered with candle's own operations on the same tensors.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, CudaStorage as CandleStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use kv_core::{
    validate, AttentionBatch, BlockId, CacheBackend, KvDType, KvError, Result, Slot, StorageSpec,
};

use crate::kernels::{self, KernelModule, MODULES, NVRTC_FLAGS};
use crate::plan::{self, flags, Geometry, GpuLayout, RowArgs, ITEM_FIELDS};

/// The first line of an error's message: candle appends a backtrace to its CUDA errors
/// when `RUST_BACKTRACE` is set, which does not belong in a one-line reason.
fn first_line(e: &dyn fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A driver or compiler error, as the backend reports it.
fn cuda_err(what: &str) -> impl Fn(&dyn fmt::Display) -> KvError + '_ {
    move |e| KvError::BackendUnavailable {
        backend: "cuda",
        reason: format!("{what}: {}", first_line(e)),
    }
}

/// Compiles one kernel module with NVRTC for `arch` (such as `"compute_90"`) with the
/// options the backend uses at run time, returning the PTX text.
///
/// The CPU-only tests call this for every module and architecture: a kernel that does not
/// compile fails there, with NVRTC's log in the error.
///
/// # Errors
/// [`KvError::BackendUnavailable`] with NVRTC's log when the source does not compile (or
/// NVRTC cannot be loaded).
pub fn compile_module(module: &KernelModule, arch: &'static str) -> Result<String> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: NVRTC_FLAGS.iter().map(|s| (*s).to_string()).collect(),
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    compile_ptx_with_opts(module.source(), opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| KvError::BackendUnavailable {
            backend: "cuda",
            reason: format!(
                "NVRTC could not compile {}.cu for {arch}: {e:?}",
                module.name
            ),
        })
}

/// PTX of every module per architecture, compiled once per process.
type PtxCache = Mutex<HashMap<&'static str, Arc<Vec<String>>>>;
static PTX: std::sync::OnceLock<PtxCache> = std::sync::OnceLock::new();

fn ptx_for(arch: &'static str) -> Result<Arc<Vec<String>>> {
    let cache = PTX.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned lock only means another thread panicked while compiling; the map holds
    // whole entries, so it stays usable.
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ptx) = map.get(arch) {
        return Ok(Arc::clone(ptx));
    }
    let ptx = Arc::new(
        MODULES
            .iter()
            .map(|m| compile_module(m, arch))
            .collect::<Result<Vec<_>>>()?,
    );
    map.insert(arch, Arc::clone(&ptx));
    Ok(ptx)
}

/// The loaded kernels of one device.
struct Functions {
    write: CudaFunction,
    read: CudaFunction,
    copy: CudaFunction,
    attend: CudaFunction,
    merge: CudaFunction,
}

/// A KV cache on an NVIDIA GPU: pools in device memory, attention in CUDA kernels.
pub struct CudaBackend {
    device: Device,
    cuda: CudaDevice,
    /// candle's stream for this device: kernels are ordered with candle's own work.
    stream: Arc<CudaStream>,
    arch: &'static str,
    fns: Functions,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device)
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

/// Block pools in GPU memory: one device allocation for every layer's K and V pools.
pub struct CudaStorage {
    spec: StorageSpec,
    geom: Geometry,
    layout: GpuLayout,
    pool: CudaSlice<u8>,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaStorage")
            .field("spec", &self.spec)
            .field("bytes", &self.pool.len())
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles the kernels for it (once per architecture and
    /// process; later backends reuse the PTX).
    ///
    /// # Errors
    /// [`KvError::BackendUnavailable`]: no such GPU, no driver, a GPU older than Volta, or
    /// a kernel NVRTC cannot compile (with its log).
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = Device::new_cuda(ordinal).map_err(|e| KvError::BackendUnavailable {
            backend: "cuda",
            reason: format!("cannot open CUDA device {ordinal}: {}", first_line(&e)),
        })?;
        let Device::Cuda(cuda) = device.clone() else {
            return Err(KvError::BackendUnavailable {
                backend: "cuda",
                reason: "candle returned a non-CUDA device".into(),
            });
        };
        let (major, minor) = cuda
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| cuda_err("compute capability")(&e))?;
        let arch = kernels::arch_for(
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        )
        .ok_or_else(|| KvError::BackendUnavailable {
            backend: "cuda",
            reason: format!("compute capability {major}.{minor} is older than 7.0 (Volta)"),
        })?;
        let ptx = ptx_for(arch)?;
        let load = |module: usize, name: &str| -> Result<CudaFunction> {
            let m = &MODULES[module];
            cuda.get_or_load_custom_func(name, &format!("kv_backend_cuda_{}", m.name), &ptx[module])
                .map(|f| f.into_cuda_function())
                .map_err(|e| cuda_err("loading a kernel")(&e))
        };
        let fns = Functions {
            write: load(0, "kv_write")?,
            read: load(1, "kv_read")?,
            copy: load(1, "kv_copy_blocks")?,
            attend: load(2, "kv_attend")?,
            merge: load(2, "kv_merge")?,
        };
        let stream = cuda.cuda_stream();
        Ok(Self {
            device,
            cuda,
            stream,
            arch,
            fns,
        })
    }

    /// The bytes of `storage` as stored, `[layer][K, V][kv_head][block][slot][row]` with rows
    /// in kv-quant's formats: for tests that hold the kernels' quantizer to kv-quant's, and
    /// for tools. Copies the whole allocation to the host.
    ///
    /// # Errors
    /// A tensor error when the copy fails.
    pub fn storage_bytes(&self, storage: &CudaStorage) -> Result<Vec<u8>> {
        Ok(self.cuda.clone_dtoh(&storage.pool)?)
    }

    /// The virtual architecture the kernels were compiled for (such as `"compute_90"`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    fn layout_of(&self, dtype: KvDType) -> Result<GpuLayout> {
        GpuLayout::of(dtype).ok_or_else(|| KvError::Unsupported {
            backend: "cuda".into(),
            what: format!("the {dtype} layout (not yet implemented in the CUDA kernels)"),
        })
    }

    fn upload(&self, data: &[u32]) -> Result<CudaSlice<u32>> {
        // A zero-length copy is not a valid allocation; pad empty lists with one unused 0.
        let padded: &[u32] = if data.is_empty() { &[0] } else { data };
        Ok(self.cuda.clone_htod(padded)?)
    }

    fn flags_of(&self, flags: &CudaSlice<u32>) -> Result<u32> {
        let host = self.cuda.clone_dtoh(flags)?;
        Ok(host.first().copied().unwrap_or(0))
    }

    /// `t` as a contiguous f32 tensor on this device (a copy only when needed).
    fn as_f32(t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.contiguous()?)
    }

    /// A `[0, a, b]` f32 tensor on the device: a one-row allocation narrowed to none, since
    /// the driver refuses zero-byte allocations.
    fn empty(&self, (a, b): (usize, usize)) -> Result<Tensor> {
        Ok(Tensor::zeros((1, a, b), DType::F32, &self.device)?.narrow(0, 0, 0)?)
    }

    fn tensor_of(&self, data: CudaSlice<f32>, dims: (usize, usize, usize)) -> Tensor {
        let storage = CandleStorage::wrap_cuda_slice(data, self.cuda.clone());
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    }
}

/// Runs `f` on the device memory of a contiguous f32 tensor (from its first element).
fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) => {
            let slice = c.as_cuda_slice::<f32>()?;
            let view = slice.slice(layout.start_offset()..);
            f(&view)
        }
        _ => Err(KvError::InvalidArgument {
            what: "tensor",
            detail: "not on a CUDA device".into(),
        }),
    }
}

/// Pushes the row arguments onto a launch of `kv_write`, `kv_read` or `kv_attend`, which
/// take them in this order after their buffers.
fn push_row_args<'a>(b: &mut LaunchArgs<'a>, a: &'a RowArgs) {
    b.arg(&a.layer)
        .arg(&a.kv_heads)
        .arg(&a.num_blocks)
        .arg(&a.block_size)
        .arg(&a.head_dim)
        .arg(&a.row_bytes)
        .arg(&a.k_fmt)
        .arg(&a.v_fmt)
        .arg(&a.group)
        .arg(&a.rotate)
        .arg(&a.hadamard);
}

fn cfg(grid: (u32, u32, u32), threads: u32, shared: usize) -> Result<LaunchConfig> {
    let too_big = |what: &'static str, n: u64, max: u64| KvError::Overflow {
        what,
        detail: format!("{n} exceeds the launch limit {max}"),
    };
    if u64::from(grid.0) > (1 << 31) - 1 {
        return Err(too_big("grid", grid.0.into(), (1 << 31) - 1));
    }
    if grid.1 > 65_535 || grid.2 > 65_535 {
        return Err(too_big("grid", grid.1.max(grid.2).into(), 65_535));
    }
    Ok(LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: plan::to_u32("shared memory", shared)?,
    })
}

impl CacheBackend for CudaBackend {
    type Storage = CudaStorage;

    fn name(&self) -> &str {
        "cuda"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn supports(&self, dtype: KvDType) -> bool {
        GpuLayout::of(dtype).is_some()
    }

    fn allocate(&self, spec: &StorageSpec) -> Result<CudaStorage> {
        let layout = self.layout_of(spec.dtype)?;
        let geom = Geometry::of(spec)?;
        // Refuses head dims whose attention tiles do not fit shared memory, before
        // allocating rather than at the first attend.
        plan::attend_tiling(
            spec.shape.n_q_heads() / spec.shape.n_kv_heads(),
            spec.shape.head_dim(),
        )?;
        // The kernels index with 32-bit block ids, slots and head dims.
        plan::to_u32("block count", spec.num_blocks)?;
        plan::to_u32("block size", spec.block_size)?;
        plan::to_u32("row bytes", geom.row_bytes)?;
        let pool = self.cuda.alloc_zeros::<u8>(geom.total_bytes()?)?;
        Ok(CudaStorage {
            spec: *spec,
            geom,
            layout,
            pool,
        })
    }

    fn spec<'a>(&self, storage: &'a CudaStorage) -> &'a StorageSpec {
        &storage.spec
    }

    fn write(
        &self,
        storage: &mut CudaStorage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        validate::write(&storage.spec, &self.device, layer, slots, k, v)?;
        if slots.is_empty() {
            return Ok(());
        }
        let (src, blocks, offsets) = plan::write_rows(slots)?;
        let rows = plan::to_u32("write rows", src.len())?;
        let (k, v) = (Self::as_f32(k)?, Self::as_f32(v)?);
        let (src, blocks, offsets) = (
            self.upload(&src)?,
            self.upload(&blocks)?,
            self.upload(&offsets)?,
        );
        let mut flag = self.cuda.alloc_zeros::<u32>(1)?;
        let d = storage.spec.shape.head_dim();
        let args = RowArgs::new(&storage.geom, storage.layout, d, layer)?;
        let launch = cfg((rows, args.kv_heads, 2), 32, d * 4)?;
        // A dry run checks every value and stores nothing; only then the storing run, with
        // the same arguments.
        for dry_run in [1i32, 0] {
            with_f32(&k, |kd| {
                with_f32(&v, |vd| {
                    let mut b = self.stream.launch_builder(&self.fns.write);
                    b.arg(&mut storage.pool)
                        .arg(kd)
                        .arg(vd)
                        .arg(&src)
                        .arg(&blocks)
                        .arg(&offsets);
                    push_row_args(&mut b, &args);
                    b.arg(&dry_run).arg(&mut flag);
                    // SAFETY: the arguments match `kv_write` (kernels/write.cu) in type and
                    // order; every row the grid touches is in the pool (slots and layer
                    // validated, geometry from the pool's spec); input indices stay below
                    // `rows x kv_heads x head_dim` of the contiguous f32 K and V.
                    unsafe { b.launch(launch) }.map_err(|e| cuda_err("kv_write")(&e))?;
                    Ok(())
                })
            })?;
            if dry_run == 1 {
                plan::write_error(self.flags_of(&flag)?, storage.spec.dtype)?;
            }
        }
        Ok(())
    }

    fn attend(
        &self,
        storage: &CudaStorage,
        layer: usize,
        q: &Tensor,
        batch: &AttentionBatch,
    ) -> Result<Tensor> {
        let spec = &storage.spec;
        validate::attend(spec, &self.device, layer, q, batch)?;
        let shape = spec.shape;
        let (q_heads, d) = (shape.n_q_heads(), shape.head_dim());
        let total = batch.total_queries();
        if total == 0 {
            return self.empty((q_heads, d));
        }
        let p = plan::plan_attend(spec, batch)?;
        let q = Self::as_f32(q)?;
        let (seqs, tables, items, merge) = (
            self.upload(&p.seqs)?,
            self.upload(&p.tables)?,
            self.upload(&p.items)?,
            self.upload(&p.merge)?,
        );
        let width = d.checked_add(2).ok_or_else(|| KvError::Overflow {
            what: "partial row",
            detail: format!("head_dim {d} + 2"),
        })?;
        let partial_len = plan::product("partial results", &[p.partial_rows, width])?;
        let mut partials = self.cuda.alloc_zeros::<f32>(partial_len)?;
        let out_len = plan::product("attention output", &[total, q_heads, d])?;
        let mut out = self.cuda.alloc_zeros::<f32>(out_len)?;
        let mut flag = self.cuda.alloc_zeros::<u32>(1)?;
        let args = RowArgs::new(&storage.geom, storage.layout, d, layer)?;
        let q_heads_u = plan::to_u32("query heads", q_heads)?;
        let (tile, max_rows) = (
            plan::to_u32("tile", p.tile)?,
            plan::to_u32("rows", p.max_rows)?,
        );
        let n_items = plan::to_u32("work items", p.items.len() / ITEM_FIELDS)?;
        let launch = cfg((n_items, 1, 1), plan::ATTEND_THREADS, p.shared_bytes)?;
        with_f32(&q, |qd| {
            let mut b = self.stream.launch_builder(&self.fns.attend);
            b.arg(&storage.pool)
                .arg(qd)
                .arg(&seqs)
                .arg(&tables)
                .arg(&items)
                .arg(&mut partials)
                .arg(&mut flag);
            push_row_args(&mut b, &args);
            b.arg(&q_heads_u)
                .arg(&batch.scale)
                .arg(&tile)
                .arg(&max_rows);
            // SAFETY: the arguments match `kv_attend` (kernels/attend.cu); the plan comes
            // from a batch validated against this storage (block ids below num_blocks);
            // items index only their own tables, queries and partial rows; the shared
            // memory passed is what the plan sized for `max_rows` rows and `tile` keys.
            unsafe { b.launch(launch) }.map_err(|e| cuda_err("kv_attend")(&e))?;
            Ok(())
        })?;
        let rows = plan::to_u32("output rows", total * q_heads)?;
        let mut b = self.stream.launch_builder(&self.fns.merge);
        b.arg(&partials)
            .arg(&merge)
            .arg(&mut out)
            .arg(&q_heads_u)
            .arg(&args.head_dim);
        // SAFETY: matches `kv_merge`; the merge table has 3 entries per output row and
        // names only partial rows the plan allocated.
        unsafe { b.launch(cfg((rows, 1, 1), 128, 0)?) }.map_err(|e| cuda_err("kv_merge")(&e))?;
        if self.flags_of(&flag)? & flags::Q_NONFINITE != 0 {
            return Err(KvError::NonFinite { what: "q" });
        }
        Ok(self.tensor_of(out, (total, q_heads, d)))
    }

    fn copy_blocks(&self, storage: &mut CudaStorage, moves: &[(BlockId, BlockId)]) -> Result<()> {
        validate::moves(&storage.spec, moves)?;
        let g = storage.geom;
        let ranges = plan::to_u32("storage ranges", g.ranges()?)?;
        let (kv_heads, num_blocks, block_size, row_bytes) = (
            plan::to_u32("kv heads", g.kv_heads)?,
            plan::to_u32("block count", g.num_blocks)?,
            plan::to_u32("block size", g.block_size)?,
            plan::to_u32("row bytes", g.row_bytes)?,
        );
        g.block_bytes()?;
        for batch in plan::copy_batches(moves)? {
            let n = plan::to_u32("moves", batch.len() / 2)?;
            let list = self.upload(&batch)?;
            let mut b = self.stream.launch_builder(&self.fns.copy);
            b.arg(&mut storage.pool)
                .arg(&list)
                .arg(&kv_heads)
                .arg(&num_blocks)
                .arg(&block_size)
                .arg(&row_bytes);
            // SAFETY: matches `kv_copy_blocks`; every block id was validated below
            // num_blocks and `ranges` is the pool's number of (layer, K/V, head) ranges.
            unsafe { b.launch(cfg((n, ranges, 1), 256, 0)?) }
                .map_err(|e| cuda_err("kv_copy_blocks")(&e))?;
        }
        Ok(())
    }

    fn read(
        &self,
        storage: &CudaStorage,
        layer: usize,
        slots: &[Slot],
    ) -> Result<(Tensor, Tensor)> {
        let spec = &storage.spec;
        validate::layer(spec, layer)?;
        validate::slots(spec, slots)?;
        let (kvh, d) = (spec.shape.n_kv_heads(), spec.shape.head_dim());
        let n = slots.len();
        if n == 0 {
            let z = self.empty((kvh, d))?;
            return Ok((z.clone(), z));
        }
        let blocks: Vec<u32> = slots
            .iter()
            .map(|s| plan::to_u32("block id", s.block.index()))
            .collect::<Result<_>>()?;
        let offsets: Vec<u32> = slots.iter().map(|s| s.offset).collect();
        let (blocks, offsets) = (self.upload(&blocks)?, self.upload(&offsets)?);
        let len = plan::product("read", &[n, kvh, d])?;
        let mut k = self.cuda.alloc_zeros::<f32>(len)?;
        let mut v = self.cuda.alloc_zeros::<f32>(len)?;
        let args = RowArgs::new(&storage.geom, storage.layout, d, layer)?;
        let rows = plan::to_u32("read rows", n)?;
        let mut b = self.stream.launch_builder(&self.fns.read);
        b.arg(&storage.pool)
            .arg(&mut k)
            .arg(&mut v)
            .arg(&blocks)
            .arg(&offsets);
        push_row_args(&mut b, &args);
        // SAFETY: matches `kv_read`; slots and layer were validated against the spec the
        // pool was sized by, and the outputs hold `n x kv_heads x head_dim` floats.
        unsafe { b.launch(cfg((rows, args.kv_heads, 2), 32, d * 4)?) }
            .map_err(|e| cuda_err("kv_read")(&e))?;
        Ok((
            self.tensor_of(k, (n, kvh, d)),
            self.tensor_of(v, (n, kvh, d)),
        ))
    }
}
