//! The backend on a GPU: block pools in device memory and the kernels of `kernels/`,
//! compiled with NVRTC for the device when it is opened.
//!
//! Everything CUDA goes through candle's device (`candle_core::cuda_backend`) and its
//! re-exported cudarc, so this crate never links a second cudarc. Kernels are launched on
//! candle's stream, so they are ordered with candle's own operations on the same tensors.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
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

use crate::blocks::{self, BlockShape, BlockWindow};
use crate::kernels::{self, KernelModule, MODULES, NVRTC_FLAGS};
use crate::kivi::{self, KiviLayer, NO_WINDOW};
use crate::plan::{self, flags, Geometry, GpuLayout, RowArgs, ITEM_FIELDS};
use crate::sample::{self, RowSample, SampleParams, SamplePlan};

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
    kivi_open: CudaFunction,
    kivi_open_values: CudaFunction,
    kivi_store: CudaFunction,
    kivi_quantize: CudaFunction,
    kivi_read: CudaFunction,
    kivi_copy: CudaFunction,
}

/// A KV cache on an NVIDIA GPU: pools in device memory, attention in CUDA kernels.
pub struct CudaBackend {
    device: Device,
    cuda: CudaDevice,
    /// candle's stream for this device: kernels are ordered with candle's own work.
    stream: Arc<CudaStream>,
    arch: &'static str,
    fns: Functions,
    /// A one-element window pool and window table for the attend launches of the row
    /// layouts, which take them but never read them.
    no_wins: CudaSlice<u16>,
    no_table: CudaSlice<u32>,
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
    /// KIVI layouts: each layer's key block windows.
    kivi: Option<KiviState>,
}

/// Tokens of a KIVI key block (`KvDType::block_tokens`; `attend.cu`'s `KIVI_TOKENS`).
const KIVI_TOKENS: usize = 32;

/// The KIVI windows of a storage: per layer, the host state and a device pool of f16
/// windows, `[window][kv_head][32][head_dim]`, grown as key blocks open.
struct KiviState {
    /// Key blocks per cache block (`block_size / 32`).
    per_block: u32,
    /// The residual R (`kivi*-rR`), 0 without: windows then also hold the values, and
    /// stay until their block is settled.
    residual: u32,
    /// f16 elements of one window (`kv_heads x 32 x head_dim`).
    window_elems: usize,
    layers: Vec<KiviDeviceLayer>,
}

#[derive(Default)]
struct KiviDeviceLayer {
    host: KiviLayer,
    /// The window pool (`None` until the first key block opens).
    wins: Option<CudaSlice<u16>>,
    /// Residual layouts: the windows' values, shaped and indexed as `wins`.
    wins_v: Option<CudaSlice<u16>>,
    /// Windows the pool holds.
    pool_windows: u32,
    /// Attention calls on this layer: a quantized block's window serves the queries of the
    /// tokens that filled it and is freed by the first write after the next attend. Atomic
    /// because `attend` takes the storage by shared reference.
    attends: AtomicU64,
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
            kivi_open: load(3, "kv_kivi_window_open")?,
            kivi_open_values: load(3, "kv_kivi_window_open_values")?,
            kivi_store: load(3, "kv_kivi_window_store")?,
            kivi_quantize: load(3, "kv_kivi_quantize")?,
            kivi_read: load(3, "kv_kivi_read")?,
            kivi_copy: load(3, "kv_kivi_window_copy")?,
        };
        let stream = cuda.cuda_stream();
        let no_wins = cuda.alloc_zeros::<u16>(1)?;
        let no_table = cuda.clone_htod(&[NO_WINDOW])?;
        Ok(Self {
            device,
            cuda,
            stream,
            arch,
            fns,
            no_wins,
            no_table,
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

    /// Grows `layer`'s window pool (and with `values` its value windows) to hold `want`
    /// windows of `elems` f16 (at least doubling, at most `max` windows, the storage's key
    /// blocks), keeping the windows it holds.
    fn ensure_windows(
        &self,
        layer: &mut KiviDeviceLayer,
        want: u32,
        elems: usize,
        max: u32,
        values: bool,
    ) -> Result<()> {
        if want <= layer.pool_windows {
            return Ok(());
        }
        let windows = want
            .max(layer.pool_windows.saturating_mul(2))
            .min(max.max(want));
        let len = plan::product("KIVI window pool", &[windows as usize, elems])?;
        let grow = |old: &Option<CudaSlice<u16>>| -> Result<CudaSlice<u16>> {
            let mut grown = self.cuda.alloc_zeros::<u16>(len)?;
            if let Some(old) = old {
                let mut head =
                    grown
                        .try_slice_mut(0..old.len())
                        .ok_or_else(|| KvError::InvalidArgument {
                            what: "KIVI window pool",
                            detail: format!("{} elements do not fit {len}", old.len()),
                        })?;
                self.stream
                    .memcpy_dtod(old, &mut head)
                    .map_err(|e| cuda_err("copying the KIVI windows")(&e))?;
            }
            Ok(grown)
        };
        // Both pools are grown before either is replaced: a failure changes nothing.
        let keys = grow(&layer.wins)?;
        let vals = if values {
            Some(grow(&layer.wins_v)?)
        } else {
            None
        };
        layer.wins = Some(keys);
        if vals.is_some() {
            layer.wins_v = vals;
        }
        layer.pool_windows = windows;
        Ok(())
    }

    /// Plans a KIVI key write to `slots` of `layer` (validated) and grows the layer's window
    /// pool for it; changes nothing the layer reads, so a failure leaves the storage as it
    /// was.
    fn kivi_prepare(
        &self,
        storage: &mut CudaStorage,
        layer: usize,
        slots: &[Slot],
    ) -> Result<PendingKivi> {
        let max = plan::to_u32(
            "KIVI key blocks",
            plan::product(
                "KIVI key blocks",
                &[
                    storage.spec.num_blocks,
                    storage.spec.block_size / KIVI_TOKENS,
                ],
            )?,
        )?;
        let st = kivi_state(&mut storage.kivi)?;
        let (elems, residual) = (st.window_elems, st.residual > 0);
        let l = kivi_layer(&mut st.layers, layer)?;
        let attends = l.attends.load(Ordering::Acquire);
        let planned =
            kivi::plan_kivi_write_in(&l.host.windows, attends, slots, KIVI_TOKENS, residual)?;
        let launches = kivi::pack_kivi_write(&l.host.slots, &planned, slots, KIVI_TOKENS)?;
        self.ensure_windows(l, launches.slots.capacity, elems, max, residual)?;
        Ok(PendingKivi {
            windows: planned.windows,
            launches,
        })
    }

    /// Runs a prepared KIVI key write: opens the windows of the key blocks it starts in,
    /// stores its keys into them in f16, quantizes the blocks it completes, then commits
    /// the layer's window state.
    fn kivi_store(
        &self,
        storage: &mut CudaStorage,
        layer: usize,
        (k, v): (&Tensor, &Tensor),
        pending: PendingKivi,
    ) -> Result<()> {
        let g = storage.geom;
        let d = storage.spec.shape.head_dim();
        let args = RowArgs::new(&g, storage.layout, d, layer)?;
        let bits = storage.layout.kivi_bits;
        let tokens = plan::to_u32("KIVI block tokens", KIVI_TOKENS)?;
        let st = kivi_state(&mut storage.kivi)?;
        let l = kivi_layer(&mut st.layers, layer)?;
        let PendingKivi { windows, launches } = pending;
        let wins = l.wins.as_mut().ok_or_else(|| KvError::InvalidArgument {
            what: "KIVI window pool",
            detail: "a write with keys but no window pool".into(),
        })?;
        // Residual layouts: the value windows, indexed as the key windows.
        let mut wins_v = match (st.residual > 0, l.wins_v.as_mut()) {
            (false, _) => None,
            (true, Some(w)) => Some(w),
            (true, None) => {
                return Err(KvError::InvalidArgument {
                    what: "KIVI window pool",
                    detail: "a residual layout's write with no value windows".into(),
                })
            }
        };
        let (v_fmt, group) = (args.v_fmt, args.group);
        let n_open = plan::to_u32("KIVI windows opened", launches.open_windows.len())?;
        if n_open > 0 {
            let (w, b) = (
                self.upload(&launches.open_windows)?,
                self.upload(&launches.open_blocks)?,
            );
            let mut lb = self.stream.launch_builder(&self.fns.kivi_open);
            lb.arg(&storage.pool).arg(&mut *wins).arg(&w).arg(&b);
            push_kivi_args(&mut lb, &args, &tokens, &bits);
            // SAFETY: matches `kv_kivi_window_open` (kernels/kivi.cu); the key blocks are in
            // validated cache blocks of this layer, and every window index is below the
            // pool's window count (grown by kivi_prepare for this assignment).
            unsafe { lb.launch(cfg((n_open, args.kv_heads, 1), 32, 0)?) }
                .map_err(|e| cuda_err("kv_kivi_window_open")(&e))?;
            if let Some(wv) = wins_v.as_mut() {
                let mut lb = self.stream.launch_builder(&self.fns.kivi_open_values);
                lb.arg(&storage.pool)
                    .arg(&mut **wv)
                    .arg(&w)
                    .arg(&b)
                    .arg(&args.layer)
                    .arg(&args.kv_heads)
                    .arg(&args.num_blocks)
                    .arg(&args.block_size)
                    .arg(&args.head_dim)
                    .arg(&args.row_bytes)
                    .arg(&tokens)
                    .arg(&v_fmt)
                    .arg(&group);
                // SAFETY: matches `kv_kivi_window_open_values`; as the key windows above:
                // validated cache blocks of this layer, windows below the value pool's
                // count (grown with the key pool), V rows of the layer's `v_fmt`.
                unsafe { lb.launch(cfg((n_open, args.kv_heads, 1), 32, 0)?) }
                    .map_err(|e| cuda_err("kv_kivi_window_open_values")(&e))?;
            }
        }
        let n_store = plan::to_u32("KIVI keys stored", launches.store_src.len())?;
        if n_store > 0 {
            let (src, w, sl) = (
                self.upload(&launches.store_src)?,
                self.upload(&launches.store_windows)?,
                self.upload(&launches.store_slots)?,
            );
            // One launch per pool: the key windows from K, the value windows (residual
            // layouts) from V, the same rows and slots.
            let store = |pool: &mut CudaSlice<u16>, rows: &Tensor| {
                with_f32(rows, |rd| {
                    let mut lb = self.stream.launch_builder(&self.fns.kivi_store);
                    lb.arg(pool)
                        .arg(rd)
                        .arg(&src)
                        .arg(&w)
                        .arg(&sl)
                        .arg(&args.kv_heads)
                        .arg(&args.head_dim)
                        .arg(&tokens);
                    // SAFETY: matches `kv_kivi_window_store`; source rows index the
                    // write's contiguous f32 rows (`rows x kv_heads x head_dim`), windows
                    // are in the pool (key and value pools have the same shape and count)
                    // and slots below 32.
                    unsafe { lb.launch(cfg((n_store, args.kv_heads, 1), 32, 0)?) }
                        .map_err(|e| cuda_err("kv_kivi_window_store")(&e))?;
                    Ok(())
                })
            };
            store(wins, k)?;
            if let Some(wv) = wins_v.as_mut() {
                store(wv, v)?;
            }
        }
        let n_quant = plan::to_u32("KIVI blocks quantized", launches.quantize_windows.len())?;
        let mut flag = None;
        if n_quant > 0 {
            let (w, b) = (
                self.upload(&launches.quantize_windows)?,
                self.upload(&launches.quantize_blocks)?,
            );
            let mut f = self.cuda.alloc_zeros::<u32>(1)?;
            let mut lb = self.stream.launch_builder(&self.fns.kivi_quantize);
            lb.arg(&mut storage.pool).arg(&*wins).arg(&w).arg(&b);
            push_kivi_args(&mut lb, &args, &tokens, &bits);
            lb.arg(&mut f);
            // SAFETY: matches `kv_kivi_quantize`; each key block is written by its own
            // thread block (a plan lists a key block once), inside the layer's K range of
            // a validated cache block; windows are in the pool.
            unsafe { lb.launch(cfg((n_quant, args.kv_heads, 1), 32, 0)?) }
                .map_err(|e| cuda_err("kv_kivi_quantize")(&e))?;
            flag = Some(f);
        }
        l.host = KiviLayer {
            windows,
            slots: launches.slots,
        };
        if let Some(f) = flag {
            if self.flags_of(&f)? != 0 {
                // The keys were checked to be f16 values, whose channel parameters always
                // fit f16: this is a kernel fault, not bad input.
                return Err(KvError::BackendUnavailable {
                    backend: "cuda",
                    reason: "kv_kivi_quantize: a key block's scale did not fit f16".into(),
                });
            }
        }
        Ok(())
    }

    /// The sizes of one block's export for `storage`.
    fn block_shape(storage: &CudaStorage) -> BlockShape {
        let g = storage.geom;
        BlockShape {
            layers: g.layers,
            kv_heads: g.kv_heads,
            head_dim: storage.spec.shape.head_dim(),
            block_size: g.block_size,
            row_bytes: g.row_bytes,
            key_blocks: storage.kivi.as_ref().map_or(0, |st| st.per_block as usize),
            window_elems: storage.kivi.as_ref().map_or(0, |st| st.window_elems),
            residual: storage.layout.residual > 0,
        }
    }

    /// Window `w` (of `elems` f16) of `pool`, copied to the host.
    fn window_to_host(
        &self,
        pool: Option<&CudaSlice<u16>>,
        w: u32,
        elems: usize,
    ) -> Result<Vec<u16>> {
        let pool = pool.ok_or_else(|| KvError::InvalidArgument {
            what: "KIVI window pool",
            detail: "a window without a pool".into(),
        })?;
        let start = plan::product("window", &[w as usize, elems])?;
        let view =
            pool.try_slice(start..start + elems)
                .ok_or_else(|| KvError::InvalidArgument {
                    what: "KIVI window pool",
                    detail: format!("window {w} is past the pool"),
                })?;
        self.stream
            .clone_dtoh(&view)
            .map_err(|e| cuda_err("copying a KIVI window")(&e))
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

/// A planned KIVI key write: the layer's windows once done and the launches that do it.
struct PendingKivi {
    windows: std::collections::BTreeMap<kivi::KeyBlock, kivi::Window>,
    launches: kivi::KiviLaunches,
}

/// The KIVI state of a storage whose layout is KIVI.
fn kivi_state(kivi: &mut Option<KiviState>) -> Result<&mut KiviState> {
    kivi.as_mut().ok_or_else(|| KvError::InvalidArgument {
        what: "storage",
        detail: "not a KIVI layout".into(),
    })
}

/// Layer `layer` (validated) of a KIVI state.
fn kivi_layer(layers: &mut [KiviDeviceLayer], layer: usize) -> Result<&mut KiviDeviceLayer> {
    let len = layers.len();
    layers.get_mut(layer).ok_or(KvError::OutOfRange {
        what: "layer",
        index: layer,
        len,
    })
}

/// Pushes the pool arguments of the KIVI block kernels (`kv_kivi_window_open`,
/// `kv_kivi_quantize`, `kv_kivi_read`), in their order after their buffers.
fn push_kivi_args<'a>(b: &mut LaunchArgs<'a>, a: &'a RowArgs, tokens: &'a u32, bits: &'a u32) {
    b.arg(&a.layer)
        .arg(&a.kv_heads)
        .arg(&a.num_blocks)
        .arg(&a.block_size)
        .arg(&a.head_dim)
        .arg(&a.row_bytes)
        .arg(tokens)
        .arg(bits);
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
        let kivi = if layout.kivi_bits > 0 {
            // kv-core only builds KIVI specs whose block size is a multiple of 32.
            let per_block = plan::to_u32("KIVI key blocks", spec.block_size / KIVI_TOKENS)?;
            Some(KiviState {
                per_block,
                residual: layout.residual,
                window_elems: plan::product(
                    "KIVI window",
                    &[geom.kv_heads, KIVI_TOKENS, spec.shape.head_dim()],
                )?,
                layers: (0..geom.layers)
                    .map(|_| KiviDeviceLayer::default())
                    .collect(),
            })
        } else {
            None
        };
        Ok(CudaStorage {
            spec: *spec,
            geom,
            layout,
            pool,
            kivi,
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
        let run = |pool: &mut CudaSlice<u8>, flag: &mut CudaSlice<u32>, dry_run: i32| {
            with_f32(&k, |kd| {
                with_f32(&v, |vd| {
                    let mut b = self.stream.launch_builder(&self.fns.write);
                    b.arg(pool)
                        .arg(kd)
                        .arg(vd)
                        .arg(&src)
                        .arg(&blocks)
                        .arg(&offsets);
                    push_row_args(&mut b, &args);
                    b.arg(&dry_run).arg(flag);
                    // SAFETY: the arguments match `kv_write` (kernels/write.cu) in type and
                    // order; every row the grid touches is in the pool (slots and layer
                    // validated, geometry from the pool's spec); input indices stay below
                    // `rows x kv_heads x head_dim` of the contiguous f32 K and V.
                    unsafe { b.launch(launch) }.map_err(|e| cuda_err("kv_write")(&e))?;
                    Ok(())
                })
            })
        };
        // A dry run checks every value and stores nothing; only then the storing run, with
        // the same arguments (KIVI keys were checked as f16 values; the window kernels
        // store them).
        run(&mut storage.pool, &mut flag, 1)?;
        plan::write_error(self.flags_of(&flag)?, storage.spec.dtype)?;
        let kivi = match storage.kivi {
            Some(_) => Some(self.kivi_prepare(storage, layer, slots)?),
            None => None,
        };
        run(&mut storage.pool, &mut flag, 0)?;
        if let Some(pending) = kivi {
            self.kivi_store(storage, layer, (&k, &v), pending)?;
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
            // An attend all the same, as the CPU backend counts it (KIVI windows).
            if let Some(l) = storage.kivi.as_ref().and_then(|st| st.layers.get(layer)) {
                l.attends.fetch_add(1, Ordering::AcqRel);
            }
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
        // KIVI: the layer's windows and the table of which key block holds which.
        let kivi_layer = match &storage.kivi {
            Some(st) => {
                let l = st.layers.get(layer).ok_or(KvError::OutOfRange {
                    what: "layer",
                    index: layer,
                    len: st.layers.len(),
                })?;
                Some((
                    l,
                    self.upload(&l.host.table(spec.num_blocks, st.per_block)?)?,
                ))
            }
            None => None,
        };
        let (wins, wins_v, table) = match &kivi_layer {
            Some((l, table)) => (
                l.wins.as_ref().unwrap_or(&self.no_wins),
                l.wins_v.as_ref().unwrap_or(&self.no_wins),
                table,
            ),
            None => (&self.no_wins, &self.no_wins, &self.no_table),
        };
        let (kivi_bits, residual) = (storage.layout.kivi_bits, storage.layout.residual);
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
                .arg(&max_rows)
                .arg(wins)
                .arg(table)
                .arg(&kivi_bits)
                .arg(wins_v)
                .arg(&residual);
            // The plan comes from a batch validated against this storage (block ids below
            // num_blocks); items index only their own tables, queries and partial rows; the
            // shared memory passed is what the plan sized for `max_rows` rows and `tile`
            // keys. KIVI: the window table has an entry per key block of the layer, naming
            // only windows of its pools (a residual layout has value windows for each; row
            // layouts and R = 0 never read the one-element stand-ins).
            // SAFETY: the arguments match `kv_attend` (kernels/attend.cu), and every index
            // and size the kernel reads is in bounds, as said above.
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
        if let Some((l, _)) = kivi_layer {
            // The queries of the tokens that filled a block have read its window now.
            l.attends.fetch_add(1, Ordering::AcqRel);
        }
        Ok(self.tensor_of(out, (total, q_heads, d)))
    }

    fn copy_blocks(&self, storage: &mut CudaStorage, moves: &[(BlockId, BlockId)]) -> Result<()> {
        validate::moves(&storage.spec, moves)?;
        // KIVI: every layer's windows after the moves, planned (and the pools grown)
        // before anything is copied.
        let kivi_plans = match &mut storage.kivi {
            Some(st) => {
                let pairs: Vec<(u32, u32)> = moves
                    .iter()
                    .map(|(f, t)| {
                        Ok((
                            plan::to_u32("block id", f.index())?,
                            plan::to_u32("block id", t.index())?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                let max = plan::to_u32(
                    "KIVI key blocks",
                    plan::product(
                        "KIVI key blocks",
                        &[storage.spec.num_blocks, st.per_block as usize],
                    )?,
                )?;
                let mut plans = Vec::with_capacity(st.layers.len());
                for l in &st.layers {
                    plans.push(l.host.plan_copy(&pairs, st.per_block, st.residual > 0)?);
                }
                let elems = st.window_elems;
                for (l, (after, _)) in st.layers.iter_mut().zip(&plans) {
                    self.ensure_windows(l, after.slots.capacity, elems, max, st.residual > 0)?;
                }
                Some(plans)
            }
            None => None,
        };
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
        if let (Some(plans), Some(st)) = (kivi_plans, storage.kivi.as_mut()) {
            let elems = plan::to_u32("KIVI window", st.window_elems)?;
            let grid = elems.div_ceil(256);
            for (l, (after, copies)) in st.layers.iter_mut().zip(plans) {
                // The key windows, and a residual layout's value windows, alike.
                for wins in [l.wins.as_mut(), l.wins_v.as_mut()].into_iter().flatten() {
                    for &(from, to) in &copies {
                        let mut b = self.stream.launch_builder(&self.fns.kivi_copy);
                        b.arg(&mut *wins).arg(&from).arg(&to).arg(&elems);
                        // SAFETY: matches `kv_kivi_window_copy`; both windows are below the
                        // pool's window count (grown above for this plan), each `elems`
                        // long. Launched one by one, in the moves' order.
                        unsafe { b.launch(cfg((grid, 1, 1), 256, 0)?) }
                            .map_err(|e| cuda_err("kv_kivi_window_copy")(&e))?;
                    }
                }
                l.host = after;
            }
        }
        Ok(())
    }

    fn supports_block_bytes(&self) -> bool {
        true
    }

    fn export_block(&self, storage: &CudaStorage, block: BlockId, out: &mut Vec<u8>) -> Result<()> {
        validate::blocks(&storage.spec, &[block])?;
        let g = storage.geom;
        let part = plan::product("block export", &[g.block_size, g.row_bytes])?;
        let mut bytes = Vec::new();
        let b = block.index();
        for layer in 0..g.layers {
            for which in 0..2 {
                for h in 0..g.kv_heads {
                    let at = g.row_offset(layer, which, h, b, 0);
                    let view = storage.pool.try_slice(at..at + part).ok_or_else(|| {
                        KvError::InvalidArgument {
                            what: "block export",
                            detail: format!("bytes {at}.. are past the pool"),
                        }
                    })?;
                    let host = self
                        .stream
                        .clone_dtoh(&view)
                        .map_err(|e| cuda_err("copying a block")(&e))?;
                    bytes.extend_from_slice(&host);
                }
            }
            if let Some(st) = &storage.kivi {
                let l = st.layers.get(layer).ok_or(KvError::OutOfRange {
                    what: "layer",
                    index: layer,
                    len: st.layers.len(),
                })?;
                let id = plan::to_u32("block id", b)?;
                for kb in 0..st.per_block {
                    let state = l.host.windows.get(&(id, kb)).copied();
                    let index = l.host.slots.of.get(&(id, kb)).copied();
                    match (state, index) {
                        // Without a residual a quantized block's window only serves the
                        // queries that filled it: the export reads as stored, as a copy.
                        (Some(w), Some(index)) if w.quantized_at.is_none() || st.residual > 0 => {
                            let keys =
                                self.window_to_host(l.wins.as_ref(), index, st.window_elems)?;
                            let values = if st.residual > 0 {
                                self.window_to_host(l.wins_v.as_ref(), index, st.window_elems)?
                            } else {
                                Vec::new()
                            };
                            blocks::push_window(
                                &mut bytes,
                                Some(&BlockWindow {
                                    filled: w.filled,
                                    quantized: w.quantized_at.is_some(),
                                    keys,
                                    values,
                                }),
                            );
                        }
                        _ => blocks::push_window(&mut bytes, None),
                    }
                }
            }
        }
        out.extend_from_slice(&bytes);
        Ok(())
    }

    fn import_block(&self, storage: &mut CudaStorage, block: BlockId, bytes: &[u8]) -> Result<()> {
        validate::blocks(&storage.spec, &[block])?;
        let shape = Self::block_shape(storage);
        let parsed = blocks::parse(&shape, storage.layout, bytes)?;
        let g = storage.geom;
        let b = block.index();
        let id = plan::to_u32("block id", b)?;
        // Every layer's windows planned and the pools grown before anything is stored.
        let mut plans = Vec::new();
        if let Some(st) = storage.kivi.as_mut() {
            let max = plan::to_u32(
                "KIVI key blocks",
                plan::product(
                    "KIVI key blocks",
                    &[storage.spec.num_blocks, st.per_block as usize],
                )?,
            )?;
            let (elems, residual) = (st.window_elems, st.residual > 0);
            for (l, p) in st.layers.iter_mut().zip(&parsed) {
                let states: Vec<Option<(u64, bool)>> = p
                    .windows
                    .iter()
                    .map(|w| w.as_ref().map(|w| (w.filled, w.quantized)))
                    .collect();
                let attends = l.attends.load(Ordering::Acquire);
                let (after, fills) = l.host.plan_import(id, &states, attends)?;
                self.ensure_windows(l, after.slots.capacity, elems, max, residual)?;
                plans.push((after, fills));
            }
        }
        let part = plan::product("block import", &[g.block_size, g.row_bytes])?;
        for (layer, p) in parsed.iter().enumerate() {
            for (which, src) in [(0usize, p.k), (1, p.v)] {
                for (h, head) in src.chunks_exact(part).enumerate() {
                    let at = g.row_offset(layer, which, h, b, 0);
                    let mut view = storage.pool.try_slice_mut(at..at + part).ok_or_else(|| {
                        KvError::InvalidArgument {
                            what: "block import",
                            detail: format!("bytes {at}.. are past the pool"),
                        }
                    })?;
                    self.stream
                        .memcpy_htod(head, &mut view)
                        .map_err(|e| cuda_err("storing a block")(&e))?;
                }
            }
        }
        if let Some(st) = storage.kivi.as_mut() {
            let elems = st.window_elems;
            for ((l, p), (after, fills)) in st.layers.iter_mut().zip(&parsed).zip(plans) {
                for (kb, index) in fills {
                    let Some(Some(w)) = p.windows.get(kb as usize) else {
                        continue;
                    };
                    let start = plan::product("window", &[index as usize, elems])?;
                    for (pool, data) in [(l.wins.as_mut(), &w.keys), (l.wins_v.as_mut(), &w.values)]
                    {
                        let (Some(pool), false) = (pool, data.is_empty()) else {
                            continue;
                        };
                        let mut view =
                            pool.try_slice_mut(start..start + elems).ok_or_else(|| {
                                KvError::InvalidArgument {
                                    what: "KIVI window pool",
                                    detail: format!("window {index} is past the pool"),
                                }
                            })?;
                        self.stream
                            .memcpy_htod(data.as_slice(), &mut view)
                            .map_err(|e| cuda_err("storing a KIVI window")(&e))?;
                    }
                }
                l.host = after;
            }
        }
        Ok(())
    }

    fn settle_blocks(&self, storage: &mut CudaStorage, blocks: &[BlockId]) -> Result<()> {
        validate::blocks(&storage.spec, blocks)?;
        if let Some(st) = &mut storage.kivi {
            let ids: Vec<u32> = blocks
                .iter()
                .map(|b| plan::to_u32("block id", b.index()))
                .collect::<Result<_>>()?;
            for l in &mut st.layers {
                l.host.settle(&ids, st.per_block);
            }
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
        if let Some(st) = &storage.kivi {
            // KIVI keys: from a filling block's window, else from the quantized block.
            let l = st.layers.get(layer).ok_or(KvError::OutOfRange {
                what: "layer",
                index: layer,
                len: st.layers.len(),
            })?;
            let windows: Vec<u32> = slots
                .iter()
                .map(|s| l.host.read_window(s, KIVI_TOKENS))
                .collect::<Result<_>>()?;
            let windows = self.upload(&windows)?;
            let tokens = plan::to_u32("KIVI block tokens", KIVI_TOKENS)?;
            let bits = storage.layout.kivi_bits;
            let mut b = self.stream.launch_builder(&self.fns.kivi_read);
            b.arg(&storage.pool)
                .arg(l.wins.as_ref().unwrap_or(&self.no_wins))
                .arg(&mut k)
                .arg(&blocks)
                .arg(&offsets)
                .arg(&windows);
            push_kivi_args(&mut b, &args, &tokens, &bits);
            // SAFETY: matches `kv_kivi_read` (kernels/kivi.cu); slots were validated, a
            // window index names a window of this layer's pool (only a key block holding
            // one gets an index), and `k` holds `n x kv_heads x head_dim` floats.
            unsafe { b.launch(cfg((rows, args.kv_heads, 1), 32, 0)?) }
                .map_err(|e| cuda_err("kv_kivi_read")(&e))?;
        }
        Ok((
            self.tensor_of(k, (n, kvh, d)),
            self.tensor_of(v, (n, kvh, d)),
        ))
    }
}

/// Samples every row of `logits` (`[rows, vocab]`, on a CUDA device) in one `kv_sample`
/// launch, one draw `u` in `[0, 1)` per row: one status and one token id per row are copied
/// back, never the logits. The distribution is kv-model's host sampler's (see
/// [`crate::sample`]); the kernel is compiled with the backend's others (once per
/// architecture and process) and loaded once per device.
///
/// # Errors
/// What [`SamplePlan::new`] and [`sample::check_draws`] refuse, checked before anything
/// runs; [`KvError::InvalidArgument`] for logits not on a CUDA device;
/// [`KvError::BackendUnavailable`] when the kernel cannot be compiled or launched. A row
/// with NaN, `+inf` or no finite logit is not an error here: its [`RowSample`] says so.
pub fn sample_rows(
    logits: &Tensor,
    params: &SampleParams,
    draws: &[f64],
) -> Result<Vec<RowSample>> {
    let (rows, vocab) = logits.dims2()?;
    let plan = SamplePlan::new(params, rows, vocab)?;
    sample::check_draws(draws, rows)?;
    let Device::Cuda(cuda) = logits.device() else {
        return Err(KvError::InvalidArgument {
            what: "logits",
            detail: "not on a CUDA device".into(),
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
    let index = MODULES
        .iter()
        .position(|m| m.name == "sample")
        .ok_or_else(|| KvError::BackendUnavailable {
            backend: "cuda",
            reason: "no sample kernel module".into(),
        })?;
    let ptx = ptx_for(arch)?;
    let func = cuda
        .get_or_load_custom_func("kv_sample", "kv_backend_cuda_sample", &ptx[index])
        .map_err(|e| cuda_err("loading kv_sample")(&e))?
        .into_cuda_function();
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let draws_d = cuda.clone_htod(draws)?;
    let mut out = cuda.alloc_zeros::<u32>(2 * rows)?;
    let stream = cuda.cuda_stream();
    let (n, stride) = (plan.vocab, u64::from(plan.vocab));
    let (temperature, top_p) = (
        f32::from_bits(plan.temperature_bits),
        f32::from_bits(plan.top_p_bits),
    );
    with_f32(&logits, |x| {
        let mut b = stream.launch_builder(&func);
        b.arg(x)
            .arg(&n)
            .arg(&stride)
            .arg(&temperature)
            .arg(&plan.top_k)
            .arg(&top_p)
            .arg(&plan.shift)
            .arg(&draws_d)
            .arg(&mut out);
        // `logits` is a contiguous [rows, vocab] f32 tensor (rows blocks read rows x vocab
        // floats from its first element); `draws_d` holds one f64 per row and `out` two u32
        // per row; the plan checked rows and vocab against the kernel's limits.
        // SAFETY: the arguments match `kv_sample` (kernels/sample.cu) in order and type.
        unsafe { b.launch(cfg((plan.rows, 1, 1), sample::THREADS, 0)?) }
            .map_err(|e| cuda_err("kv_sample")(&e))?;
        Ok(())
    })?;
    let pairs = cuda.clone_dtoh(&out)?;
    pairs
        .chunks_exact(2)
        .map(|p| RowSample::decode(p[0], p[1]))
        .collect()
}
