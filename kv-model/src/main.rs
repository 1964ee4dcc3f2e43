//! `kv`: generate text with a KV cache (or without one, to see what it saves), and size
//! KV caches for known models.

#![forbid(unsafe_code)]
// Tests unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kv_attention::SlidingLayers;
use kv_backend_cpu::CpuBackend;
use kv_backend_cuda::CudaBackend;
use kv_core::{memory, KvDType, ModelShape};
use kv_model::{
    Activations, CacheLayout, ChatOptions, ChatSession, ChatTemplate, GenerateOptions, Generation,
    LlamaConfig, ModelError, Result, SamplingConfig, Tokenizer, WeightFormat, WindowConfig,
};

#[derive(Debug, Parser)]
#[command(
    name = "kv",
    version,
    about = "An LLM KV cache you can watch work",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the model's kernels and attention [default: one per core].
    #[arg(long, global = true)]
    threads: Option<usize>,
}

/// Most threads `--threads` may start: far above any core count this runs on, low enough
/// that a typo cannot exhaust the process's threads.
const MAX_THREADS: usize = 1024;

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it, then print what it cost.
    Generate(GenerateArgs),
    /// Print how much memory a KV cache needs, per layout.
    Mem(MemArgs),
    /// Perplexity of a text with the KV cache in each layout, against f16.
    ///
    /// Scored like llama.cpp's perplexity tool, so the numbers compare across engines: the
    /// text's tokens are cut into non-overlapping chunks of --ctx tokens (a shorter tail is
    /// dropped), the first token of each chunk is replaced by BOS if the model's vocabulary
    /// adds BOS (SmolLM2's does not), and each chunk is scored on its second half only.
    /// Every layout runs the same chunks through the cache as generation does: each group
    /// of --batch tokens is written (quantized) into the cache before its attention reads
    /// it. The table gives perplexity, its change against f16, the mean KL divergence of
    /// the next-token distribution from f16's, and how often the most likely token is
    /// f16's; a layout more than 10% worse than f16 is marked unsuitable for the model.
    Ppl(PplArgs),
    /// Perplexity over a text longer than a sliding window: the full cache, the window with
    /// attention sinks, and the plain window (no sinks), StreamingLLM's comparison.
    ///
    /// The text runs through one sequence, --chunk tokens per forward pass, as generation
    /// feeds it; every token after the first sinks + window tokens is scored, so all three
    /// runs score the same tokens and the windowed runs have evicted before the first.
    /// The full-cache run is skipped when the text is longer than the context.
    WindowPpl(WindowPplArgs),
    /// Generate from many prompts at once (continuous batching, greedy), sharing one
    /// cache with prefix reuse, and print per-sequence and aggregate tokens/s and how the
    /// cache's blocks were used, shared and reused.
    Batch(BatchArgs),
    /// Print the token ids of a text, as llama.cpp's llama-tokenize does (also on
    /// vocabulary-only GGUF files).
    Tokenize(TokenizeArgs),
    /// Talk with the model, turn after turn, keeping the conversation's cache.
    ///
    /// On a terminal: type a turn after `> ` (`/reset` starts over, `/exit` or end of input
    /// leaves). Otherwise standard input holds the user turns, one per line (blank lines
    /// skipped), and each reply is written to stdout followed by a newline. Every turn
    /// renders the whole conversation with the chat template and prefills only the tokens
    /// the cache does not already hold; stderr shows per turn how many were reused,
    /// prefilled and generated.
    Chat(ChatArgs),
}

/// How tokens are picked: the options `kv generate` and `kv chat` share.
#[derive(Debug, Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to P.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SamplingArgs {
    /// The checked configuration.
    fn config(&self) -> Result<SamplingConfig> {
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        sampling.validate()?;
        Ok(sampling)
    }
}

/// How a command that takes prompts wraps them: `--raw`, or `--chat-template NAME|FILE`,
/// or else the model file's own template (shared by `generate` and `batch`, so both read
/// and behave the same; see [`prompt_format`]).
#[derive(Debug, Args)]
struct TemplateArgs {
    /// Use the prompt text as is, without a chat template (for base models, and for files
    /// without `tokenizer.chat_template`, as some Gemma GGUFs).
    #[arg(long)]
    raw: bool,
    /// Chat template to use instead of the file's own: a built-in (chatml, llama2, llama3,
    /// gemma) or a Jinja file.
    #[arg(long, value_name = "NAME|FILE", conflicts_with = "raw")]
    chat_template: Option<String>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    /// GGUF model file [default: $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A system turn that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Most tokens the conversation holds (its cache is sized for them) [default: the
    /// model's context, at most 4096].
    #[arg(long, allow_negative_numbers = true)]
    context: Option<usize>,
    /// Layout of cached K/V rows.
    #[arg(long, default_value = "f16")]
    dtype: KvDType,
    /// Tokens per cache block [default: 16, or 32 for the KIVI layouts].
    #[arg(long, allow_negative_numbers = true)]
    block_size: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Chat template to use instead of the file's own: a built-in (chatml, llama2, llama3,
    /// gemma) or a Jinja file.
    #[arg(long, value_name = "NAME|FILE")]
    chat_template: Option<String>,
    /// How the model's projection weights are held (see `kv generate --help`).
    #[arg(long, value_enum, default_value_t = Weights::Blocks)]
    weights: Weights,
    /// How activations meet the block weights: exact f32 (the default), or q8: rounded to
    /// 8 bits per block of 32 with integer dot products (faster, less accurate; Q4_0, Q4_1
    /// and Q8_0 weights only, see docs/measurements.md).
    #[arg(long, value_enum, default_value_t = Acts::Exact)]
    activations: Acts,
    /// Continue the conversation saved in FILE (by --save): its messages and the K/V of
    /// its tokens are loaded, so the next turn prefills only what is new. A file saved by
    /// another model, layout, block size or backend is refused.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Save the conversation to FILE (messages, JSON) and FILE.kvc (the K/V of its tokens)
    /// after every turn, atomically.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "file"])))]
struct TokenizeArgs {
    /// GGUF file with the vocabulary (a model, or a vocabulary-only file) [default:
    /// $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(long)]
    text: Option<String>,
    /// A UTF-8 file whose whole content is tokenized.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Add BOS/EOS as the vocabulary asks (tokenizer.ggml.add_bos_token, add_eos_token).
    #[arg(long)]
    add_special: bool,
    /// Print one token per line with its text (`id -> 'piece'`) instead of the ids.
    #[arg(long)]
    pieces: bool,
}

#[derive(Debug, Args)]
struct BatchArgs {
    /// GGUF model file [default: $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text file with one prompt per line (blank lines skipped), each wrapped in the
    /// model's chat template unless --raw.
    #[arg(long)]
    prompts: PathBuf,
    #[command(flatten)]
    template: TemplateArgs,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Layout of cached K/V rows.
    #[arg(long, default_value = "f16")]
    dtype: KvDType,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    block_size: usize,
    /// Cache capacity in blocks [default: enough for every prompt at once]; a smaller
    /// cache preempts and recomputes sequences instead of failing.
    #[arg(long, allow_negative_numbers = true)]
    blocks: Option<usize>,
    /// Cache capacity as a memory budget in MiB instead of --blocks: as many blocks as fit
    /// (never more than every prompt at once needs).
    #[arg(long, conflicts_with = "blocks")]
    cache_mib: Option<u64>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    max_batch: usize,
    /// Also generate each prompt alone, one after another, and print batched/sequential.
    #[arg(long)]
    compare: bool,
    /// Block store tier (as `kv generate --store`): prompts' blocks found there are
    /// restored instead of prefilled, blocks the cache evicts and those of preempted
    /// sequences are written there, and what is still cached at the end is written too.
    #[arg(long, value_name = "host|disk:DIR|redis://HOST:PORT")]
    store: Option<String>,
    /// Byte budget of --store, in MiB (least recently used blocks go first).
    #[arg(long, default_value_t = 1024)]
    store_mib: u64,
    /// Also write the run's numbers as JSON to this file (per sequence: prompt, reused and
    /// prefilled tokens, time to first token; with --store, what the tier did), for
    /// scripts such as `cargo xtask fleet`.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
    /// How activations meet the block weights: exact f32 (the default), or q8: rounded to
    /// 8 bits per block of 32 with integer dot products (faster, less accurate; Q4_0, Q4_1
    /// and Q8_0 weights only, see docs/measurements.md).
    #[arg(long, value_enum, default_value_t = Acts::Exact)]
    activations: Acts,
    /// Where the model and the cache run (cuda: not with --store or --compare).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
}

#[derive(Debug, Args)]
struct PplArgs {
    /// GGUF model file [default: $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to score (any UTF-8 text file).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per chunk (llama.cpp's --ctx-size).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Cache layouts to evaluate, comma separated (KIVI with a residual of R tokens in f16:
    /// kivi2-r32, kivi4-r128, ...); f16 always runs as the reference.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f16,int8-g32,int4-g32,int4-g64,int4h-g32,kivi4,kivi2"
    )]
    dtype: Vec<KvDType>,
    /// Tokens written and attended per forward pass (1 is generation's decode loop; every
    /// layout, KIVI's included, computes the same for any value, up to summation order).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Tokens per cache block (a multiple of 32 for KIVI layouts).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    /// Score only the first N chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// How the model's projection weights are held (see `kv generate --help`).
    #[arg(long, value_enum, default_value_t = Weights::Blocks)]
    weights: Weights,
    /// Put BOS before the whole text's tokens and then cut the chunks, as llama.cpp's
    /// perplexity tool does (it tokenizes the text with BOS), so both score the very same
    /// tokens. Without it the chunks start at the text's first token. Changes nothing when
    /// the vocabulary adds no BOS (SmolLM2's); Gemma's does.
    #[arg(long)]
    bos_first: bool,
    /// How activations meet the block weights: exact f32 (the default), or q8: rounded to
    /// 8 bits per block of 32 with integer dot products (faster, less accurate; Q4_0, Q4_1
    /// and Q8_0 weights only, see docs/measurements.md).
    #[arg(long, value_enum, default_value_t = Acts::Exact)]
    activations: Acts,
    /// Where the model and the cache run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// GGUF model file [default: $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt (wrapped in the model's chat template unless --raw) [default: read from
    /// standard input].
    #[arg(long)]
    prompt: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Recompute the whole sequence at every step instead of caching K/V (--dtype,
    /// --block-size and --backend then do not apply).
    #[arg(long)]
    no_cache: bool,
    /// Layout of cached K/V rows (f32, f16, bf16; others if the backend supports them).
    #[arg(long, default_value = "f16")]
    dtype: KvDType,
    /// Tokens per cache block [default: 16, or 32 for the KIVI layouts, whose keys are
    /// quantized per 32 tokens].
    #[arg(long, allow_negative_numbers = true)]
    block_size: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    template: TemplateArgs,
    /// How the model's projection weights are held: the file's blocks with kv's kernels
    /// (fastest, exact activations), f32 (exact, 4 bytes per weight) or candle's quantized
    /// matmul (activations rounded to 8 bits).
    #[arg(long, value_enum, default_value_t = Weights::Blocks)]
    weights: Weights,
    /// How activations meet the block weights: exact f32 (the default), or q8: rounded to
    /// 8 bits per block of 32 with integer dot products (faster, less accurate; Q4_0, Q4_1
    /// and Q8_0 weights only, see docs/measurements.md).
    #[arg(long, value_enum, default_value_t = Acts::Exact)]
    activations: Acts,
    /// Where the cache lives.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Also write the summary as JSON to this file (for scripts such as `cargo xtask demo`).
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Sliding window (StreamingLLM): keep only the last W tokens (up to a block more)
    /// besides the sinks, so generation runs past the model's context with a cache that
    /// stops growing; --max-tokens is then not limited by the context.
    #[arg(long, allow_negative_numbers = true)]
    window: Option<usize>,
    /// Generate exactly --max-tokens tokens: do not stop at the model's end-of-turn tokens
    /// (for long runs and measurements).
    #[arg(long)]
    ignore_stop: bool,
    /// With --window: the first S tokens stay in the cache for the whole run (attention
    /// sinks); a multiple of --block-size.
    #[arg(
        long,
        default_value_t = 0,
        requires = "window",
        allow_negative_numbers = true
    )]
    sinks: usize,
    /// Prompt cache file: the first run saves the K/V of the prompt's full blocks there, a
    /// later run whose prompt starts the same loads them and prefills only the rest (a
    /// file from another model or configuration is reported and not used).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["no_cache", "window"])]
    prompt_cache: Option<PathBuf>,
    /// Block store tier: `host` (this process's memory), `disk:DIR` (a directory of
    /// content-addressed block files, shared by runs and processes) or
    /// `redis://HOST:PORT` (shared by machines; needs the `redis` feature). The prompt's blocks
    /// found there are restored instead of prefilled; hits, bytes moved and prefill saved
    /// go to stderr.
    #[arg(
        long,
        value_name = "host|disk:DIR|redis://HOST:PORT",
        conflicts_with_all = ["no_cache", "window", "prompt_cache"]
    )]
    store: Option<String>,
    /// Byte budget of --store, in MiB (least recently used blocks go first).
    #[arg(long, default_value_t = 1024)]
    store_mib: u64,
}

#[derive(Debug, Args)]
struct WindowPplArgs {
    /// GGUF model file [default: $KV_MODEL_DIR or ~/.cache/kv/models, SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to score (any UTF-8 text file).
    #[arg(long)]
    text: PathBuf,
    /// Recent tokens the windowed caches keep.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Attention sinks of the sinks run (the plain-window run has none).
    #[arg(long, default_value_t = 32)]
    sinks: usize,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    tokens: Option<usize>,
    /// Layout of cached K/V rows.
    #[arg(long, default_value = "f16")]
    dtype: KvDType,
    /// Tokens per cache block.
    #[arg(long, default_value_t = 32)]
    block_size: usize,
}

/// The run-time choice of cache backend: a thin switch over the generic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Host memory, CPU attention.
    Cpu,
    /// NVIDIA GPU 0: weights, activations and cache in device memory (build with
    /// `--features cuda`; without it, or without a GPU, a one-line error says so).
    Cuda,
}

/// [`kv_model::WeightFormat`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Weights {
    /// The file's blocks with kv's own kernels (Q4_0/Q4_1/Q8_0, Q5_0/Q5_1, Q4_K/Q5_K/Q6_K;
    /// others expanded to f32).
    Blocks,
    /// Expanded to f32 at load, candle's GEMM.
    F32,
    /// The file's quantized blocks with candle's quantized matmul.
    Quantized,
}

/// [`kv_model::Activations`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Acts {
    /// f32 activations, never rounded.
    Exact,
    /// Rounded to 8 bits per block of 32, integer dot products.
    Q8,
}

impl From<Acts> for Activations {
    fn from(a: Acts) -> Self {
        match a {
            Acts::Exact => Activations::Exact,
            Acts::Q8 => Activations::Q8,
        }
    }
}

impl From<Weights> for WeightFormat {
    fn from(w: Weights) -> Self {
        match w {
            Weights::Blocks => WeightFormat::Blocks,
            Weights::F32 => WeightFormat::F32,
            Weights::Quantized => WeightFormat::Quantized,
        }
    }
}

/// A backend made from [`Backend`].
// One per process, chosen once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Chosen {
    Cpu(CpuBackend),
    Cuda(CudaBackend),
}

/// The device the model runs on for `backend`, and the CUDA backend when that is the
/// choice (its typed error when no GPU can be had: without the `cuda` feature, without a
/// driver, without a device).
fn open_backend(backend: Backend) -> Result<(candle_core::Device, Option<CudaBackend>)> {
    Ok(match backend {
        Backend::Cpu => (candle_core::Device::Cpu, None),
        Backend::Cuda => {
            let b = CudaBackend::new(0)?;
            (kv_core::CacheBackend::device(&b).clone(), Some(b))
        }
    })
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "preset"])))]
struct MemArgs {
    /// Read the shape from this GGUF file's metadata.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A known model instead of a file.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ModelShape::PRESETS))]
    preset: Option<String>,
    /// Tokens in the cache (all sequences together).
    #[arg(long)]
    tokens: usize,
    /// Only this layout [default: all].
    #[arg(long)]
    dtype: Option<KvDType>,
    /// Tokens per cache block (sliding-window layers free whole blocks).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    if let Err(e) = use_threads(cli.threads) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Run on a worker of rayon's pool: the kernels' parallel loops then split work with the
    // calling thread instead of waking the pool and sleeping on a latch, which cost a third
    // of a decode step in context switches (~200 parallel matmuls per token).
    let result = rayon::scope(|_| match cli.command {
        Command::Generate(args) => generate(args),
        Command::Mem(args) => mem(args),
        Command::Ppl(args) => ppl(args),
        Command::Batch(args) => batch(args),
        Command::WindowPpl(args) => window_ppl(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Chat(args) => chat(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors of the tensor library can span lines; users get one.
            let msg = e.to_string();
            let msg = msg
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            // Names, metadata and tokens from files can hold terminal escapes.
            eprintln!("error: {}", kv_model::escape_controls(&msg));
            ExitCode::FAILURE
        }
    }
}

/// Help and version print as clap renders them; usage errors become one line.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        // Nothing useful to do if printing help fails.
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // `kv` alone: the subcommands, on stderr, and a usage error's exit code.
        let _ = e.print();
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = if line.is_empty() {
        "error: invalid command line".to_string()
    } else {
        line
    };
    eprintln!("{line} (see `kv --help`)");
    ExitCode::from(2)
}

/// Refuses 0 for an option that counts something.
fn at_least_one(what: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(ModelError::InvalidArgument {
            what,
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    Ok(())
}

/// Sizes rayon's global pool, which the kernels and the CPU backend run on.
fn use_threads(threads: Option<usize>) -> Result<()> {
    let Some(n) = threads else { return Ok(()) };
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(ModelError::InvalidArgument {
            what: "--threads",
            expected: format!("1 to {MAX_THREADS}"),
            got: n.to_string(),
        });
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| ModelError::InvalidArgument {
            what: "--threads",
            expected: "a thread count the system can start".into(),
            got: format!("{n} ({e})"),
        })
}

/// `--prompt`, or standard input when it is absent (at most [`kv_model::MAX_TEXT_BYTES`]).
fn prompt_text(prompt: Option<String>) -> Result<String> {
    let text = match prompt {
        Some(p) => p,
        None => {
            use std::io::{IsTerminal, Read};
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(ModelError::InvalidArgument {
                    what: "--prompt",
                    expected: "a prompt, given with --prompt or piped to standard input".into(),
                    got: "neither".into(),
                });
            }
            let mut text = String::new();
            stdin
                .lock()
                .take(kv_model::MAX_TEXT_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(|source| ModelError::Io {
                    path: "<standard input>".into(),
                    source,
                })?;
            if text.len() as u64 > kv_model::MAX_TEXT_BYTES {
                return Err(ModelError::InvalidArgument {
                    what: "prompt on standard input",
                    expected: format!("at most {} bytes", kv_model::MAX_TEXT_BYTES),
                    got: "more".into(),
                });
            }
            // A piped file usually ends with a newline that is not part of the prompt.
            text.truncate(text.trim_end_matches(['\n', '\r']).len());
            if text.is_empty() {
                return Err(ModelError::InvalidArgument {
                    what: "--prompt",
                    expected: "a prompt, given with --prompt or piped to standard input".into(),
                    got: "neither (standard input was empty)".into(),
                });
            }
            text
        }
    };
    if text.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    Ok(text)
}

fn generate(mut args: GenerateArgs) -> Result<()> {
    let prompt_text = prompt_text(args.prompt.take())?;
    let sampling = args.sampling.config()?;
    at_least_one("--max-tokens", args.max_tokens)?;
    if let Some(bs) = args.block_size {
        at_least_one("--block-size", bs)?;
    }
    let window = args.window.map(|window| WindowConfig {
        sinks: args.sinks,
        window,
    });
    if let Some(w) = &window {
        // What needs no model; the context is checked once the model is read, before
        // anything is generated.
        at_least_one("--window", w.window)?;
        if w.sinks.checked_add(w.window).is_none() {
            return Err(ModelError::InvalidArgument {
                what: "--sinks plus --window",
                expected: "a sum that fits the model's context".into(),
                got: format!("{} + {}", w.sinks, w.window),
            });
        }
    }
    if args.no_cache && window.is_some() {
        return Err(ModelError::InvalidArgument {
            what: "--window",
            expected: "a cache (the window is a cache policy)".into(),
            got: "--no-cache".into(),
        });
    }
    // Before the model loads, so an unavailable backend fails fast. The model goes where
    // the backend's tensors live (with --no-cache too: the GPU then runs it uncached).
    let (device, cuda) = open_backend(args.backend)?;
    let backend = match (args.no_cache, cuda) {
        (true, _) => None,
        (false, None) => Some(Chosen::Cpu(CpuBackend::new())),
        (false, Some(b)) => Some(Chosen::Cuda(b)),
    };
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let (mut model, tokenizer) = kv_model::load_on(&path, &device, args.weights.into())?;
    model.set_activations(args.activations.into());
    let context = model.config().context_length;
    if window.is_none() && args.max_tokens > context {
        return Err(ModelError::ContextOverflow {
            what: "--max-tokens",
            needed: args.max_tokens,
            context,
        });
    }
    let text = prompt_format(&tokenizer, &path, &args.template)?.render(prompt_text)?;
    let prompt = tokenizer.encode(&text)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens: if args.ignore_stop {
            Vec::new()
        } else {
            tokenizer.stop_tokens().to_vec()
        },
        keep_logits: false,
    };
    let layout = CacheLayout {
        dtype: args.dtype,
        block_size: args.block_size.unwrap_or_else(|| {
            let t = args.dtype.block_tokens().max(1);
            16usize.div_ceil(t) * t
        }),
    };
    if let Some(w) = &window {
        w.validate(layout.block_size, layout.dtype, context)?;
    }

    let mut out = std::io::stdout().lock();
    let mut stream = tokenizer.stream();
    let on_token = |token: u32| -> Result<()> {
        if let Some(piece) = stream.push(token)? {
            out.write_all(piece.as_bytes())
                .and_then(|()| out.flush())
                .map_err(ModelError::Output)?;
        }
        Ok(())
    };
    let cached = |b, on_token| {
        let file = args.prompt_cache.as_deref().unwrap_or(Path::new(""));
        generate_prompt_cached(
            &model, &tokenizer, &path, b, layout, file, &prompt, &options, on_token,
        )
    };
    let run: Generation = match (backend, window) {
        (Some(Chosen::Cpu(b)), None) if args.prompt_cache.is_some() => cached(b, on_token)?,
        (Some(Chosen::Cpu(b)), None) if args.store.is_some() => {
            let spec = args.store.as_deref().unwrap_or("host");
            let tier = open_store(spec, args.store_mib)?;
            let fingerprint =
                kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu")?;
            let (run, report) = model.generate_with_store(
                b,
                layout,
                fingerprint,
                vec![tier],
                &prompt,
                &options,
                on_token,
            )?;
            let s = report.stats;
            eprintln!(
                "store {}: {} block hits, {} misses, {} of {} prompt tokens restored (prefill \
                 saved), {} bytes loaded, {} bytes saved, {} values rejected, {} store errors",
                kv_model::escape_controls(spec),
                s.hits,
                s.misses,
                report.reused_tokens,
                prompt.len(),
                s.bytes_loaded,
                s.bytes_saved,
                s.rejected,
                s.store_errors
            );
            if let Some(e) = &report.last_error {
                eprintln!(
                    "store error (the run went on without it): {}",
                    kv_model::escape_controls(e)
                );
            }
            run
        }
        (None, _) => model.generate_uncached(&prompt, &options, on_token)?,
        (Some(Chosen::Cpu(b)), None) => model.generate(b, layout, &prompt, &options, on_token)?,
        (Some(Chosen::Cuda(b)), None) => model.generate(b, layout, &prompt, &options, on_token)?,
        (Some(Chosen::Cpu(b)), Some(w)) => {
            model.generate_windowed(b, layout, w, &prompt, &options, on_token)?
        }
        (Some(Chosen::Cuda(b)), Some(w)) => {
            model.generate_windowed(b, layout, w, &prompt, &options, on_token)?
        }
    };
    let tail = stream.finish()?.unwrap_or_default();
    // The text alone on stdout (so `kv generate > out.txt` holds only the text); what the
    // run cost on stderr.
    writeln!(out, "{tail}").map_err(ModelError::Output)?;
    eprintln!("\n{}", run.summary);
    if let Some(path) = &args.summary_json {
        let s = &run.summary;
        let json = format!(
            "{{\"prompt_tokens\":{},\"generated_tokens\":{},\"prefill_tokens_per_s\":{:.3},\"decode_tokens_per_s\":{:.3},\"cache_bytes_in_use\":{},\"cache_bytes_per_token\":{}}}\n",
            s.prompt_tokens,
            s.generated_tokens,
            s.prefill_tokens_per_s(),
            s.decode_tokens_per_s(),
            s.cache_bytes_in_use(),
            s.cache_bytes_per_token()
        );
        std::fs::write(path, json).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A chat template chosen on the command line, or the model file's own.
enum Template<'t> {
    /// `tokenizer.chat_template` of the file.
    Own(&'t ChatTemplate),
    /// A built-in or a Jinja file named by `--chat-template` (boxed: a compiled template
    /// is hundreds of bytes, the borrowed one a pointer).
    Chosen(Box<ChatTemplate>),
}

impl std::ops::Deref for Template<'_> {
    type Target = ChatTemplate;

    fn deref(&self) -> &ChatTemplate {
        match self {
            Template::Own(t) => t,
            Template::Chosen(t) => t.as_ref(),
        }
    }
}

/// How prompts become the model's text: as is, or through a chat template.
enum PromptFormat<'t> {
    Raw,
    Template(Template<'t>),
}

impl PromptFormat<'_> {
    /// The text the model sees for one user prompt.
    fn render(&self, prompt: String) -> Result<String> {
        match self {
            PromptFormat::Raw => Ok(prompt),
            PromptFormat::Template(t) => t.render(&prompt),
        }
    }
}

/// The one place a command picks its chat template: `--chat-template NAME|FILE` when given
/// (a built-in, else a Jinja file), else the file's own; a file without one is the typed
/// error naming the options. `or_else` ends that error's hint with the command's other
/// ways out (`generate` and `batch` add `--raw`; `chat` has none).
fn chosen_template<'t>(
    tokenizer: &'t Tokenizer,
    model: &Path,
    chat_template: Option<&str>,
    or_else: &str,
) -> Result<Template<'t>> {
    if let Some(name) = chat_template {
        let (bos, eos) = tokenizer.special_texts();
        return Ok(Template::Chosen(Box::new(ChatTemplate::builtin_or_file(
            name, bos, eos,
        )?)));
    }
    tokenizer
        .chat_template()
        .map(Template::Own)
        .ok_or_else(|| ModelError::Unsupported {
            what: "chat template",
            detail: format!(
                "{} has none; pass --chat-template NAME|FILE (built-ins: {}){or_else}",
                model.display(),
                ChatTemplate::builtin_names().join(", ")
            ),
        })
}

/// [`chosen_template`] for the commands with `--raw` (`generate`, `batch`).
fn prompt_format<'t>(
    tokenizer: &'t Tokenizer,
    model: &Path,
    args: &TemplateArgs,
) -> Result<PromptFormat<'t>> {
    if args.raw {
        return Ok(PromptFormat::Raw);
    }
    let template = chosen_template(
        tokenizer,
        model,
        args.chat_template.as_deref(),
        " or --raw to use the prompt text as is",
    )?;
    Ok(PromptFormat::Template(template))
}

/// Default of `kv chat --context`: the most tokens a session holds when not told.
const CHAT_CONTEXT: usize = 4096;

fn chat(args: ChatArgs) -> Result<()> {
    use std::io::IsTerminal;
    let sampling = args.sampling.config()?;
    at_least_one("--max-tokens", args.max_tokens)?;
    if let Some(bs) = args.block_size {
        at_least_one("--block-size", bs)?;
    }
    if let Some(c) = args.context {
        at_least_one("--context", c)?;
    }
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let (mut model, tokenizer) = kv_model::load_with(&path, args.weights.into())?;
    model.set_activations(args.activations.into());
    let model_context = model.config().context_length;
    if let Some(c) = args.context.filter(|&c| c > model_context) {
        return Err(ModelError::ContextOverflow {
            what: "--context",
            needed: c,
            context: model_context,
        });
    }
    // A conversation needs a template: chat has no --raw.
    let template = chosen_template(&tokenizer, &path, args.chat_template.as_deref(), "")?;
    let layout = CacheLayout {
        dtype: args.dtype,
        block_size: args.block_size.unwrap_or_else(|| {
            let t = args.dtype.block_tokens().max(1);
            16usize.div_ceil(t) * t
        }),
    };
    let options = ChatOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens: tokenizer.stop_tokens().to_vec(),
        system: args.system,
        context_tokens: args.context.unwrap_or(model_context.min(CHAT_CONTEXT)),
    };
    let mut session = ChatSession::new(
        &model,
        &tokenizer,
        &template,
        CpuBackend::new(),
        layout,
        options,
    )?;
    let fingerprint = match (&args.save, &args.resume) {
        (None, None) => None,
        _ => Some(kv_model::model_fingerprint(
            &path, &model, &tokenizer, layout, "cpu",
        )?),
    };
    if let (Some(file), Some(fp)) = (&args.resume, fingerprint) {
        let loaded = session.resume(file, fp)?;
        eprintln!(
            "(resumed {}: {} messages, {} tokens of K/V restored)",
            kv_model::escape_controls(&file.display().to_string()),
            loaded.messages,
            loaded.tokens
        );
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut input = stdin.lock();
    let mut out = std::io::stdout().lock();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = read_turn(&mut input)? else {
            break;
        };
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        if interactive {
            match line.trim() {
                "/exit" | "/quit" => break,
                "/reset" => {
                    session.reset();
                    eprintln!("(conversation cleared)");
                    continue;
                }
                _ => {}
            }
        }
        let mut stream = tokenizer.stream();
        let mut started = false;
        let result = session.turn(line, |token| {
            started = true;
            if let Some(piece) = stream.push(token)? {
                out.write_all(piece.as_bytes())
                    .and_then(|()| out.flush())
                    .map_err(ModelError::Output)?;
            }
            Ok(())
        });
        // A reply, even one cut short, ends with a newline; a turn refused before its first
        // token writes nothing.
        if started {
            let tail = stream.finish()?.unwrap_or_default();
            writeln!(out, "{tail}")
                .and_then(|()| out.flush())
                .map_err(ModelError::Output)?;
        }
        match result {
            Ok(turn) => {
                eprintln!("{}", turn.report);
                if let Some(line) = kv_model::window_saving(&session.cache_usage()) {
                    eprintln!("{line}");
                }
                if let (Some(file), Some(fp)) = (&args.save, fingerprint) {
                    session.save(file, fp)?;
                }
            }
            // A failed turn leaves the conversation as it was: a person can go on.
            Err(e) if interactive => {
                eprintln!("error: {}", kv_model::escape_controls(&e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The next line of standard input (at most [`kv_model::MAX_TEXT_BYTES`]), or `None` at
/// its end.
fn read_turn(input: &mut impl std::io::BufRead) -> Result<Option<String>> {
    use std::io::{BufRead, Read};
    let io = |source| ModelError::Io {
        path: "<standard input>".into(),
        source,
    };
    let mut bytes = Vec::new();
    let n = input
        .by_ref()
        .take(kv_model::MAX_TEXT_BYTES + 1)
        .read_until(b'\n', &mut bytes)
        .map_err(io)?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.len() as u64 > kv_model::MAX_TEXT_BYTES {
        return Err(ModelError::InvalidArgument {
            what: "turn on standard input",
            expected: format!("at most {} bytes", kv_model::MAX_TEXT_BYTES),
            got: "more".into(),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| ModelError::InvalidArgument {
            what: "turn on standard input",
            expected: "UTF-8 text".into(),
            got: "invalid UTF-8".into(),
        })
}

/// What a `--store` tier did in a `kv batch` run, for the report.
fn store_line(spec: &str, s: &kv_attention::store::TierStats, last_error: Option<&str>) -> String {
    let mut line = format!(
        "store {}       {} block hits ({} tokens restored: prefill saved), {} misses; \
         {} bytes loaded, {} bytes written ({} blocks written down on eviction or at the end); \
         {} restores skipped as dearer than prefill, {} values rejected, {} store errors",
        kv_model::escape_controls(spec),
        s.hits,
        s.tokens_loaded,
        s.misses,
        s.bytes_loaded,
        s.bytes_saved,
        s.blocks_spilled,
        s.restores_skipped,
        s.rejected,
        s.store_errors
    );
    if let Some(e) = last_error {
        line.push_str(&format!(
            "\nstore error (the run went on without it): {}",
            kv_model::escape_controls(e)
        ));
    }
    line
}

/// The tier `--store` names: `host` or `disk:DIR`.
fn open_store(spec: &str, mib: u64) -> Result<Box<dyn kv_attention::store::BlockStore>> {
    let budget = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| ModelError::InvalidArgument {
            what: "--store-mib",
            expected: "a budget below 2^44 MiB".into(),
            got: mib.to_string(),
        })?;
    if spec == "host" {
        return Ok(Box::new(kv_attention::store::HostStore::new(budget)));
    }
    if let Some(dir) = spec.strip_prefix("disk:").filter(|d| !d.is_empty()) {
        let store = kv_attention::store::DiskStore::open(Path::new(dir), budget).map_err(|e| {
            ModelError::InvalidArgument {
                what: "--store",
                expected: "a directory that can be created and written".into(),
                got: format!("{dir}: {e}"),
            }
        })?;
        return Ok(Box::new(store));
    }
    if spec.starts_with("redis://") {
        return redis_store(spec);
    }
    Err(ModelError::InvalidArgument {
        what: "--store",
        expected: "host, disk:DIR or redis://HOST:PORT".into(),
        got: kv_model::escape_controls(spec),
    })
}

/// `--store redis://HOST:PORT`: values live a day; each operation waits at most 2 s, and a
/// server that is down costs the run only the prefill it would have saved.
#[cfg(feature = "redis")]
fn redis_store(url: &str) -> Result<Box<dyn kv_attention::store::BlockStore>> {
    let store =
        kv_attention::store::RedisStore::new(url, 24 * 3600, std::time::Duration::from_secs(2))
            .map_err(|e| ModelError::InvalidArgument {
                what: "--store",
                expected: "a Redis URL, redis://HOST:PORT".into(),
                got: kv_model::escape_controls(&e.to_string()),
            })?;
    Ok(Box::new(store))
}

#[cfg(not(feature = "redis"))]
fn redis_store(url: &str) -> Result<Box<dyn kv_attention::store::BlockStore>> {
    Err(ModelError::Unsupported {
        what: "--store",
        detail: format!(
            "{}: this kv was built without Redis support (cargo build --features redis)",
            kv_model::escape_controls(url)
        ),
    })
}

/// `kv generate --prompt-cache FILE` on the CPU backend: what the file did goes to stderr.
#[allow(clippy::too_many_arguments)]
fn generate_prompt_cached(
    model: &kv_model::Model,
    tokenizer: &Tokenizer,
    model_path: &Path,
    backend: CpuBackend,
    layout: CacheLayout,
    file: &Path,
    prompt: &[u32],
    options: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let fingerprint = kv_model::model_fingerprint(
        model_path,
        model,
        tokenizer,
        layout,
        kv_core::CacheBackend::name(&backend),
    )?;
    let (run, report) = model.generate_with_prompt_cache(
        backend,
        layout,
        fingerprint,
        file,
        prompt,
        options,
        on_token,
    )?;
    let shown = kv_model::escape_controls(&file.display().to_string());
    if let Some(e) = &report.load_error {
        eprintln!(
            "prompt cache {shown} not used: {}",
            kv_model::escape_controls(e)
        );
    }
    eprintln!(
        "prompt cache {shown}: {} of {} prompt tokens loaded ({} bytes), {} prefilled, {} saved",
        report.loaded_tokens,
        prompt.len(),
        report.loaded_bytes,
        prompt.len() - report.loaded_tokens,
        report.saved_tokens
    );
    if let Some(e) = &report.save_error {
        eprintln!(
            "prompt cache {shown} not saved: {}",
            kv_model::escape_controls(e)
        );
    }
    Ok(run)
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let text = match (args.text, &args.file) {
        (Some(text), _) => text,
        (None, Some(file)) => std::fs::read_to_string(file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?,
        (None, None) => {
            return Err(ModelError::InvalidArgument {
                what: "input",
                expected: "--text or --file".into(),
                got: "neither".into(),
            })
        }
    };
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let tokenizer = Tokenizer::from_gguf_file(&path)?;
    let ids = tokenizer.encode_with(&text, args.add_special, true)?;
    let mut out = std::io::stdout().lock();
    if args.pieces {
        for &id in &ids {
            writeln!(out, "{id:6} -> '{}'", tokenizer.piece(id)?).map_err(ModelError::Output)?;
        }
    } else {
        let line: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "{}", line.join(" ")).map_err(ModelError::Output)?;
    }
    Ok(())
}

fn batch(args: BatchArgs) -> Result<()> {
    use kv_core::StorageSpec;
    at_least_one("--max-tokens", args.max_tokens)?;
    at_least_one("--block-size", args.block_size)?;
    at_least_one("--max-batch", args.max_batch)?;
    if let Some(b) = args.blocks {
        at_least_one("--blocks", b)?;
    }
    let lines = kv_model::read_text(&args.prompts)?;
    let lines: Vec<&str> = lines.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    let (device, cuda) = open_backend(args.backend)?;
    if cuda.is_some() && (args.store.is_some() || args.compare) {
        return Err(ModelError::Unsupported {
            what: "option with --backend cuda",
            detail: "--store and --compare run on the CPU backend only".into(),
        });
    }
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let (mut model, tokenizer) = kv_model::load_on(&path, &device, kv_model::WeightFormat::Blocks)?;
    model.set_activations(args.activations.into());
    let format = prompt_format(&tokenizer, &path, &args.template)?;
    let prompts = lines
        .iter()
        .map(|l| tokenizer.encode(&format.render((*l).to_owned())?))
        .collect::<Result<Vec<_>>>()?;
    let options = kv_model::BatchOptions {
        max_tokens: args.max_tokens,
        stop_tokens: tokenizer.stop_tokens().to_vec(),
        max_batch: args.max_batch,
    };
    // Every prompt against the context before anything is sized by its length.
    let context = model.config().context_length;
    let mut needed: usize = 0;
    for (i, p) in prompts.iter().enumerate() {
        let total = p.len().saturating_add(args.max_tokens);
        if total > context {
            return Err(ModelError::InvalidArgument {
                what: "--prompts",
                expected: format!(
                    "every prompt plus --max-tokens within the model's context of {context} \
                     tokens"
                ),
                got: format!("prompt {} needs {total}", i + 1),
            });
        }
        // Each term is at most the context: the sum of a line count of them cannot
        // overflow in practice, and is checked anyway.
        needed = needed
            .checked_add(total.div_ceil(args.block_size))
            .ok_or_else(|| ModelError::InvalidArgument {
                what: "--prompts",
                expected: "a cache size that fits in memory".into(),
                got: format!("{} prompts", prompts.len()),
            })?;
    }
    let blocks = match args.blocks {
        // More blocks than every sequence at its longest can never be used.
        Some(b) if b > needed => {
            return Err(ModelError::InvalidArgument {
                what: "--blocks",
                expected: format!(
                    "at most {needed} (every prompt plus --max-tokens at once, in blocks of {})",
                    args.block_size
                ),
                got: b.to_string(),
            })
        }
        Some(b) => b,
        None => needed,
    };
    let spec = match args.cache_mib {
        Some(mib) => {
            let budget = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| ModelError::InvalidArgument {
                    what: "--cache-mib",
                    expected: "a budget that fits in u64 bytes".into(),
                    got: mib.to_string(),
                })?;
            let fit = StorageSpec::builder(model.shape(), args.dtype)
                .block_size(args.block_size)
                .memory_budget(budget)
                .build()?;
            // Blocks past what every sequence at once needs would never be used.
            let blocks = fit.num_blocks.min(needed);
            StorageSpec::new(model.shape(), args.dtype, args.block_size, blocks)?
        }
        None => StorageSpec::new(model.shape(), args.dtype, args.block_size, blocks)?,
    };
    // With sliding-window layers, two cache groups: the window layers free their blocks as
    // each sequence slides (with --store too: the tiers keep each group's blocks).
    let longest = prompts
        .iter()
        .map(|p| p.len().saturating_add(args.max_tokens))
        .max()
        .unwrap_or(1);
    let (run, tiers, tier_stats) = match (cuda, args.store.as_deref()) {
        (Some(backend), _) => {
            let mut cache =
                model.new_batch_cache(backend, spec, longest, args.max_batch, 0x6b76)?;
            (
                model.generate_batch(&mut cache, &prompts, &options)?,
                None,
                None,
            )
        }
        (None, None) => {
            let mut cache =
                model.new_batch_cache(CpuBackend::new(), spec, longest, args.max_batch, 0x6b76)?;
            (
                model.generate_batch(&mut cache, &prompts, &options)?,
                None,
                None,
            )
        }
        (None, Some(store)) => {
            let tier = open_store(store, args.store_mib)?;
            let layout = CacheLayout {
                dtype: args.dtype,
                block_size: args.block_size,
            };
            let fingerprint =
                kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu")?;
            let cache =
                model.new_batch_cache(CpuBackend::new(), spec, longest, args.max_batch, 0x6b76)?;
            let mut tiered = kv_attention::TieredCache::new(cache, fingerprint, vec![tier]);
            let run = model.generate_batch_with_store(&mut tiered, &prompts, &options)?;
            let line = store_line(store, &tiered.stats(), tiered.last_error());
            (run, Some(line), Some(tiered.stats()))
        }
    };
    if let Some(path) = &args.summary_json {
        let sequences: Vec<serde_json::Value> = run
            .sequences
            .iter()
            .map(|s| {
                serde_json::json!({
                    "prompt_tokens": s.prompt_tokens,
                    "reused_tokens": s.reused_tokens,
                    "prefilled_tokens": s.prefilled_tokens,
                    "generated_tokens": s.tokens.len(),
                    "first_token_ms": s.first_token.as_secs_f64() * 1e3,
                })
            })
            .collect();
        let store = tier_stats.map(|t| {
            serde_json::json!({
                "hits": t.hits,
                "misses": t.misses,
                "tokens_loaded": t.tokens_loaded,
                "bytes_loaded": t.bytes_loaded,
                "bytes_saved": t.bytes_saved,
                "blocks_spilled": t.blocks_spilled,
                "restores_skipped": t.restores_skipped,
                "rejected": t.rejected,
                "store_errors": t.store_errors,
            })
        });
        let json = serde_json::json!({
            "wall_ms": run.wall_time.as_secs_f64() * 1e3,
            "generated_tokens": run.generated_tokens(),
            "sequences": sequences,
            "store": store,
        });
        std::fs::write(path, format!("{json}\n")).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let mut out = std::io::stdout().lock();
    let w = |out: &mut std::io::StdoutLock<'_>, s: String| {
        writeln!(out, "{s}").map_err(ModelError::Output)
    };
    for (i, seq) in run.sequences.iter().enumerate() {
        let text = tokenizer.decode(&seq.tokens)?;
        w(
            &mut out,
            format!("[{i}] {}\n    -> {}", lines[i], text.replace('\n', " ")),
        )?;
    }
    w(&mut out, format!("\n{run}"))?;
    if let Some(line) = tiers {
        w(&mut out, line)?;
    }
    if args.compare {
        let layout = CacheLayout {
            dtype: args.dtype,
            block_size: args.block_size,
        };
        let gen = GenerateOptions {
            max_tokens: args.max_tokens,
            stop_tokens: options.stop_tokens.clone(),
            ..GenerateOptions::default()
        };
        let started = std::time::Instant::now();
        let (mut tokens, mut same) = (0, true);
        for (prompt, seq) in prompts.iter().zip(&run.sequences) {
            let alone = model.generate(CpuBackend::new(), layout, prompt, &gen, |_| Ok(()))?;
            tokens += alone.tokens.len();
            same &= alone.tokens == seq.tokens;
        }
        let secs = started.elapsed().as_secs_f64();
        let sequential = if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        };
        w(
            &mut out,
            format!(
                "sequential       {tokens} tokens in {secs:.3} s = {sequential:.1} tokens/s (one prompt at a time, no prefix cache)"
            ),
        )?;
        let ratio = if sequential > 0.0 {
            run.tokens_per_s() / sequential
        } else {
            0.0
        };
        w(
            &mut out,
            format!(
                "batched / sequential = {ratio:.2}x; greedy tokens {}",
                if same { "identical" } else { "differ" }
            ),
        )?;
    }
    Ok(())
}

fn ppl(args: PplArgs) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    if args.ctx < 3 {
        return Err(ModelError::InvalidArgument {
            what: "--ctx",
            expected: "at least 3 tokens per chunk".into(),
            got: args.ctx.to_string(),
        });
    }
    at_least_one("--batch", args.batch)?;
    at_least_one("--block-size", args.block_size)?;
    if let Some(c) = args.chunks {
        at_least_one("--chunks", c)?;
    }
    let text = kv_model::read_text(&args.text)?;
    let (device, cuda) = open_backend(args.backend)?;
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let (mut model, tokenizer) = kv_model::load_on(&path, &device, args.weights.into())?;
    model.set_activations(args.activations.into());
    // The text's own tokens (`encode` would prepend BOS already, and --bos-first twice).
    let mut tokens = tokenizer.encode_with(&text, false, true)?;
    if let (true, Some(bos)) = (args.bos_first, tokenizer.bos_to_add()) {
        tokens.insert(0, bos);
    }
    let options = kv_model::ppl::PerplexityOptions {
        ctx: args.ctx,
        layouts: args.dtype,
        block_size: args.block_size,
        batch: args.batch,
        max_chunks: args.chunks,
    };
    // Drawn on stderr only when it is a terminal.
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} passes, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let progress = |p: &kv_model::ppl::PerplexityProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("chunk {}/{} {}", p.chunk + 1, p.chunks, p.layout));
    };
    let bos = tokenizer.bos_to_add();
    let report = match &cuda {
        None => model.perplexity(&CpuBackend::new(), &tokens, bos, &options, progress)?,
        Some(b) => model.perplexity(b, &tokens, bos, &options, progress)?,
    };
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} on {}, {:?} weights, {:?} activations, BOS {}",
        path.display(),
        args.text.display(),
        args.weights,
        args.activations,
        if tokenizer.bos_to_add().is_some() {
            "first in every chunk"
        } else {
            "not added (the vocabulary does not ask for it)"
        }
    )
    .and_then(|()| write!(out, "{report}"))
    .map_err(ModelError::Output)
}

fn window_ppl(args: WindowPplArgs) -> Result<()> {
    at_least_one("--window", args.window)?;
    at_least_one("--chunk", args.chunk)?;
    at_least_one("--block-size", args.block_size)?;
    if let Some(t) = args.tokens {
        at_least_one("--tokens", t)?;
    }
    let score_from =
        args.sinks
            .checked_add(args.window)
            .ok_or_else(|| ModelError::InvalidArgument {
                what: "--sinks plus --window",
                expected: "a sum that fits the model's context".into(),
                got: format!("{} + {}", args.sinks, args.window),
            })?;
    if args.chunk > args.window {
        return Err(ModelError::InvalidArgument {
            what: "--chunk",
            expected: format!(
                "at most --window ({}): a longer pass would attend past the window",
                args.window
            ),
            got: args.chunk.to_string(),
        });
    }
    let text = kv_model::read_text(&args.text)?;
    let path = args.model.unwrap_or_else(kv_model::default_model_path);
    let (model, tokenizer) = kv_model::load(&path)?;
    let mut tokens = tokenizer.encode(&text)?;
    if let Some(n) = args.tokens {
        tokens.truncate(n);
    }
    let layout = CacheLayout {
        dtype: args.dtype,
        block_size: args.block_size,
    };
    // Everything checked before the first line is printed.
    if args.chunk >= tokens.len() {
        return Err(ModelError::InvalidArgument {
            what: "--chunk",
            expected: format!(
                "fewer tokens than the text's {} (one pass over the whole text would never \
                 slide the window)",
                tokens.len()
            ),
            got: args.chunk.to_string(),
        });
    }
    if score_from >= tokens.len() {
        return Err(ModelError::InvalidArgument {
            what: "--sinks plus --window",
            expected: format!(
                "fewer than the text's {} tokens (tokens after them are scored)",
                tokens.len()
            ),
            got: score_from.to_string(),
        });
    }
    let context = model.config().context_length;
    for sinks in [args.sinks, 0] {
        WindowConfig {
            sinks,
            window: args.window,
        }
        .validate(args.block_size, args.dtype, context)?;
    }
    let mut runs: Vec<Option<WindowConfig>> = Vec::new();
    if tokens.len() <= model.config().context_length {
        runs.push(None);
    }
    runs.push(Some(WindowConfig {
        sinks: args.sinks,
        window: args.window,
    }));
    runs.push(Some(WindowConfig {
        sinks: 0,
        window: args.window,
    }));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} tokens of {}, {} per forward pass, {} cache in blocks of {}; scored: tokens {}.. ({} tokens)",
        tokens.len(),
        args.text.display(),
        args.chunk,
        args.dtype,
        args.block_size,
        score_from,
        tokens.len().saturating_sub(score_from)
    )
    .and_then(|()| {
        writeln!(
            out,
            "cache                      perplexity   mean NLL  peak blocks  evicted  seconds"
        )
    })
    .map_err(ModelError::Output)?;
    for window in runs {
        let started = std::time::Instant::now();
        let score = model.perplexity_streaming(
            CpuBackend::new(),
            layout,
            window,
            &tokens,
            args.chunk,
            score_from,
        )?;
        let name = match window {
            None => "full".to_string(),
            Some(w) if w.sinks == 0 => format!("window {} (no sinks)", w.window),
            Some(w) => format!("window {} + {} sinks", w.window, w.sinks),
        };
        writeln!(
            out,
            "{name:<26} {:>10.4} {:>10.5} {:>12} {:>8} {:>8.1}",
            score.perplexity(),
            score.mean_nll,
            score.peak_blocks,
            score.evicted_tokens,
            started.elapsed().as_secs_f64()
        )
        .map_err(ModelError::Output)?;
    }
    Ok(())
}

fn mem(args: MemArgs) -> Result<()> {
    let mut config = None;
    let (name, shape) = match (&args.model, &args.preset) {
        (Some(path), _) => {
            let c = LlamaConfig::from_gguf_file(path)?;
            let shape = c.shape()?;
            config = Some(c);
            (path.display().to_string(), shape)
        }
        (None, Some(preset)) => (preset.clone(), ModelShape::preset(preset)?),
        (None, None) => {
            return Err(ModelError::InvalidArgument {
                what: "model",
                expected: "--model PATH or --preset NAME".into(),
                got: "neither".into(),
            })
        }
    };
    let dtypes: Vec<KvDType> = match args.dtype {
        Some(d) => vec![d],
        None => KvDType::ALL.to_vec(),
    };
    let mut out = std::io::stdout().lock();
    let mut table = memory_table(&name, &shape, &dtypes, args.tokens)?;
    if let Some(c) = &config {
        at_least_one("--block-size", args.block_size)?;
        table.push_str(&window_note(
            c,
            &shape,
            &dtypes,
            args.tokens,
            args.block_size,
        )?);
    }
    out.write_all(table.as_bytes()).map_err(ModelError::Output)
}

/// For a model with sliding-window layers (Gemma 3): what kv's cache holds for one
/// sequence decoded to `tokens` tokens, the sliding layers having freed their blocks behind
/// the window ([`SlidingLayers::blocks_held`]), against every layer keeping every token, both
/// in whole blocks as the cache reserves them (`CacheUsage::sliding` reports the same).
fn window_note(
    config: &LlamaConfig,
    shape: &ModelShape,
    dtypes: &[KvDType],
    tokens: usize,
    block_size: usize,
) -> Result<String> {
    use std::fmt::Write as _;
    let Some(window) = config.sliding_window else {
        return Ok(String::new());
    };
    let layers = shape.n_layers();
    let local = (0..layers)
        .filter(|&l| config.layer_window(l).is_some())
        .count() as u64;
    let global = layers as u64 - local;
    let Some(w) = std::num::NonZeroUsize::new(window) else {
        return Ok(String::new());
    };
    let blocks = tokens.div_ceil(block_size) as u64;
    let held = SlidingLayers::blocks_held(w, block_size, tokens) as u64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sliding window: {local} of {layers} layers attend only to the last {window} tokens and \
         free older blocks; one sequence of {tokens} tokens in blocks of {block_size}: \
         {global} layers x {blocks} blocks + {local} layers x {held} blocks, against {layers} \
         layers x {blocks} blocks all global:"
    );
    for &d in dtypes {
        let per_token = memory::bytes_per_token(shape, d)? as u64;
        let per_layer_token = per_token / layers as u64;
        let overflow = || ModelError::InvalidArgument {
            what: "--tokens",
            expected: format!("a count whose {} cache fits in 2^64 bytes", d.name()),
            got: tokens.to_string(),
        };
        let block = per_layer_token
            .checked_mul(block_size as u64)
            .ok_or_else(overflow)?;
        let all = (layers as u64)
            .checked_mul(blocks)
            .and_then(|b| b.checked_mul(block))
            .ok_or_else(overflow)?;
        let windowed = global
            .checked_mul(blocks)
            .and_then(|g| local.checked_mul(held).and_then(|l| g.checked_add(l)))
            .and_then(|b| b.checked_mul(block))
            .ok_or_else(overflow)?;
        if d.residual_tokens() > 0 {
            // `Model::sliding_layers`: the f16 residual is settled per sequence, not per
            // group, so these layouts keep every layer's tokens.
            let _ = writeln!(
                s,
                "  {:<10} {:>12} (one group: layouts with an f16 residual keep every token)",
                d.name(),
                memory::format_bytes(all),
            );
            continue;
        }
        let _ = writeln!(
            s,
            "  {:<10} {:>12} instead of {:>12} ({:.1}x less)",
            d.name(),
            memory::format_bytes(windowed),
            memory::format_bytes(all),
            all as f64 / windowed.max(1) as f64
        );
    }
    Ok(s)
}

fn attention_kind(shape: &ModelShape) -> String {
    match (shape.n_kv_heads(), shape.group_size()) {
        (_, 1) => "multi-head attention".into(),
        (1, _) => "multi-query attention".into(),
        (_, g) => format!("grouped-query attention, {g} query heads per KV head"),
    }
}

/// The text `kv mem` prints.
fn memory_table(
    name: &str,
    shape: &ModelShape,
    dtypes: &[KvDType],
    tokens: usize,
) -> Result<String> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let rows = |s: &mut String, shape: &ModelShape| -> Result<()> {
        let _ = writeln!(
            s,
            "  {:<10} {:>12} {:>12} {:>12} {:>12}",
            "layout", "bytes/token", "per token", "total", "window/seq"
        );
        let mut window = false;
        for &d in dtypes {
            // kv-core's formula multiplies unchecked: the product is checked here.
            let sizes = memory::bytes_per_token(shape, d).map(|per| {
                let per = per as u64;
                (per, per.checked_mul(tokens as u64))
            });
            match sizes {
                Ok((per_token, None)) => {
                    return Err(ModelError::InvalidArgument {
                        what: "--tokens",
                        expected: format!(
                        "a count whose {} cache fits in 2^64 bytes ({per_token} bytes per token)",
                        d.name()
                    ),
                        got: tokens.to_string(),
                    })
                }
                Ok((per_token, Some(total))) => {
                    // The f16 windows of one decoding sequence, blocks of 32 (KIVI's least).
                    let w = memory::sequence_window_bytes(shape, d, 32)?;
                    window |= w > 0;
                    let _ = writeln!(
                        s,
                        "  {:<10} {:>12} {:>12} {:>12} {:>12}",
                        d.name(),
                        per_token,
                        memory::format_bytes(per_token),
                        memory::format_bytes(total),
                        if w == 0 {
                            "-".to_string()
                        } else {
                            memory::format_bytes(w as u64)
                        }
                    );
                }
                // In the full table a layout that cannot hold this head size is listed as
                // such; asked for alone, it is an error.
                Err(_) if dtypes.len() > 1 => {
                    let _ = writeln!(
                        s,
                        "  {:<10} does not fit head dim {}",
                        d.name(),
                        shape.head_dim()
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        if window {
            let _ = writeln!(
                s,
                "  window/seq: f16 copies each decoding sequence holds on top of the total, \
                 cache blocks of 32 (kivi: the keys of its last, filling 32-token block; \
                 kivi-rR: K and V of its last R tokens too, in 32-token blocks)"
            );
        }
        Ok(())
    };
    let _ = writeln!(
        s,
        "{name}: {} layers, {} query heads, {} KV heads, head dim {} ({})",
        shape.n_layers(),
        shape.n_q_heads(),
        shape.n_kv_heads(),
        shape.head_dim(),
        attention_kind(shape)
    );
    let _ = writeln!(s, "KV cache for {tokens} tokens:");
    rows(&mut s, shape)?;
    let mha = shape.as_multi_head();
    if mha == *shape {
        let _ = writeln!(
            s,
            "with one KV head per query head: the same (this model already has one)"
        );
    } else {
        let _ = writeln!(
            s,
            "with one KV head per query head ({} KV heads), {}x more:",
            mha.n_kv_heads(),
            shape.group_size()
        );
        rows(&mut s, &mha)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_turns_are_read_a_line_at_a_time() {
        let mut input = std::io::Cursor::new(b"first turn\n\nlast, no newline".to_vec());
        assert_eq!(
            read_turn(&mut input).unwrap().as_deref(),
            Some("first turn\n")
        );
        assert_eq!(read_turn(&mut input).unwrap().as_deref(), Some("\n"));
        assert_eq!(
            read_turn(&mut input).unwrap().as_deref(),
            Some("last, no newline")
        );
        assert_eq!(read_turn(&mut input).unwrap(), None);
        let mut bad = std::io::Cursor::new(vec![b'a', 0xFF, b'\n']);
        assert!(matches!(
            read_turn(&mut bad),
            Err(ModelError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn window_note_counts_local_layers_at_their_window() {
        use candle_core::quantized::gguf_file::Value;
        let mut md = std::collections::HashMap::new();
        md.insert(
            "general.architecture".to_string(),
            Value::String("gemma3".into()),
        );
        for (key, v) in [
            ("block_count", 18),
            ("embedding_length", 640),
            ("feed_forward_length", 2048),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 1),
            ("attention.key_length", 256),
            ("attention.sliding_window", 512),
            ("context_length", 32768),
            ("vocab_size", 262144),
        ] {
            md.insert(format!("gemma3.{key}"), Value::U32(v));
        }
        let c = LlamaConfig::from_metadata(&md).unwrap();
        let note = window_note(&c, &c.shape().unwrap(), &[KvDType::F16], 32768, 16).unwrap();
        // 3 global layers x 32768 + 15 local x 512 tokens (32 blocks: position 32256 starts
        // one), 1 KiB per layer and token (K and V of one 256-element f16 head), against
        // 18 x 32768.
        let windowed = memory::format_bytes((3 * 32768 + 15 * 512) * 1024);
        let all = memory::format_bytes(18 * 32768 * 1024);
        assert!(note.contains("15 of 18 layers"), "{note}");
        assert!(note.contains(&windowed) && note.contains(&all), "{note}");
        assert!(note.contains("5.6x less"), "{note}");
        // One token more starts a block the window reaches into: 33 blocks.
        let note = window_note(&c, &c.shape().unwrap(), &[KvDType::F16], 32769, 16).unwrap();
        let windowed = memory::format_bytes((3 * 2049 + 15 * 33) * 16 * 1024);
        assert!(note.contains(&windowed), "{note}");
        assert!(!note.contains("not"), "{note}");
        let residual: KvDType = "kivi4-r128".parse().unwrap();
        let note = window_note(&c, &c.shape().unwrap(), &[residual], 32768, 16).unwrap();
        assert!(note.contains("one group"), "{note}");
    }

    #[test]
    fn llama2_7b_f16_at_4096_tokens_is_2_gib() {
        let shape = ModelShape::preset("llama-2-7b").unwrap();
        let t = memory_table("llama-2-7b", &shape, &[KvDType::F16], 4096).unwrap();
        assert!(t.contains(" 2 GiB"), "{t}");
        assert!(t.contains("512 KiB"), "{t}");
        assert!(t.contains("the same"), "{t}");
    }

    #[test]
    fn gqa_table_shows_the_multi_head_alternative() {
        let shape = ModelShape::preset("smollm2-135m").unwrap();
        let t = memory_table("smollm2-135m", &shape, KvDType::ALL, 8192).unwrap();
        assert!(t.contains("180 MiB"), "{t}"); // f16 with 3 KV heads
        assert!(t.contains("540 MiB"), "{t}"); // f16 with 9
        assert!(t.contains("3x more"), "{t}");
        assert!(t.contains("grouped-query"), "{t}");
    }

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from([
            "kv",
            "generate",
            "--prompt",
            "hi",
            "--dtype",
            "bf16",
            "--block-size",
            "1",
            "--no-cache",
        ])
        .unwrap();
        match cli.command {
            Command::Generate(a) => {
                assert_eq!(a.dtype, KvDType::BF16);
                assert_eq!(a.block_size, Some(1));
                assert!(a.no_cache && !a.template.raw);
                assert_eq!(a.max_tokens, 128);
            }
            _ => panic!("parsed the wrong command"),
        }
        assert!(Cli::try_parse_from(["kv", "generate", "--prompt", "x", "--dtype", "f8"]).is_err());
        assert!(Cli::try_parse_from(["kv", "mem", "--tokens", "5"]).is_err());
        assert!(Cli::try_parse_from([
            "kv",
            "mem",
            "--tokens",
            "5",
            "--preset",
            "llama-2-7b",
            "--model",
            "x.gguf"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["kv", "mem", "--tokens", "5", "--preset", "gpt-5"]).is_err());
    }

    #[test]
    fn batch_and_generate_take_the_same_template_options() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        let template = |c| match c {
            Command::Batch(a) => a.template,
            Command::Generate(a) => a.template,
            other => panic!("parsed the wrong command: {other:?}"),
        };
        for cmd in [
            ["kv", "batch", "--prompts", "p.txt"],
            ["kv", "generate", "--prompt", "x"],
        ] {
            let t = template(parse(&cmd).unwrap());
            assert!(!t.raw && t.chat_template.is_none(), "{cmd:?}");
            let t = template(parse(&[&cmd[..], &["--raw"]].concat()).unwrap());
            assert!(t.raw && t.chat_template.is_none(), "{cmd:?}");
            let with = [&cmd[..], &["--chat-template", "t.jinja"]].concat();
            let t = template(parse(&with).unwrap());
            assert_eq!(t.chat_template.as_deref(), Some("t.jinja"));
            assert!(!t.raw);
            let both = [&cmd[..], &["--raw", "--chat-template", "gemma"]].concat();
            let e = parse(&both).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{cmd:?}"
            );
        }
    }

    #[test]
    fn memory_table_counts_quantized_layouts_exactly() {
        let shape = ModelShape::preset("smollm2-135m").unwrap();
        let t = memory_table("smollm2-135m", &shape, KvDType::ALL, 8192).unwrap();
        let row = |name: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing: {t}"))
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        };
        assert_eq!(row("f16"), "23040");
        assert_eq!(row("int8-g32"), "12240");
        assert_eq!(row("int4-g32"), "7200");
        assert_eq!(row("kivi4"), "7200");
        assert_eq!(row("kivi2"), "4320");
        assert!(t.contains("int8-g128  does not fit head dim 64"), "{t}");
        let window = |name: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .and_then(|l| l.split_whitespace().nth(6))
                .unwrap_or_default()
                .to_string()
        };
        // 30 layers x 3 heads x 32 tokens x 64 dims x 2 bytes of keys.
        assert_eq!(window("kivi2"), "360");
        // 5 blocks of 32 tokens, K and V: 30 x 5 x 24 KiB.
        assert_eq!(window("kivi2-r128"), "3.52");
        assert_eq!(window("f16"), "-");
        assert!(t.contains("window/seq: f16 copies"), "{t}");
    }

    #[test]
    fn ppl_and_quantized_layouts_parse() {
        let cli = Cli::try_parse_from([
            "kv",
            "ppl",
            "--text",
            "t.txt",
            "--ctx",
            "2048",
            "--dtype",
            "f16,int8,kivi4",
        ])
        .unwrap();
        match cli.command {
            Command::Ppl(a) => {
                assert_eq!(a.ctx, 2048);
                let want: Vec<KvDType> = ["f16", "int8-g32", "kivi4"]
                    .iter()
                    .map(|n| n.parse().unwrap())
                    .collect();
                assert_eq!(a.dtype, want);
                assert_eq!((a.batch, a.block_size, a.chunks), (64, 32, None));
                assert!(!a.bos_first);
            }
            _ => panic!("parsed the wrong command"),
        }
        let cli = Cli::try_parse_from(["kv", "ppl", "--text", "t", "--bos-first"]).unwrap();
        assert!(matches!(cli.command, Command::Ppl(a) if a.bos_first));
        assert!(Cli::try_parse_from(["kv", "ppl", "--text", "t", "--dtype", "int3"]).is_err());
        assert!(Cli::try_parse_from(["kv", "ppl", "--ctx", "512"]).is_err());
        // Generation takes every layout; KIVI gets 32-token blocks unless told otherwise.
        let cli =
            Cli::try_parse_from(["kv", "generate", "--prompt", "x", "--dtype", "int4"]).unwrap();
        match cli.command {
            Command::Generate(a) => {
                assert_eq!(a.dtype, "int4-g32".parse().unwrap());
                assert_eq!(a.block_size, None);
            }
            _ => panic!("parsed the wrong command"),
        }
    }
}
