//! `tessera verify-bench`: the reproducible measurement behind `docs/verification.md`.
//! Honest and substituted nodes generate real jobs, an auditor replays every one, and each
//! scenario prints one JSON line (stdout) with its false-positive or detection rates at
//! several tolerances, distance quantiles and the audit's cost; `--markdown` adds the table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use tessera_models::engine::REPLAY_CHUNK;
use tessera_models::verify_bench::{
    self as vb, audit, claim_of, figure, generate, with_threads, ScenarioReport,
};
use tessera_models::{catalog, Backend, Model, Prompt};

/// The scenarios, in the order they run.
const SCENARIOS: &[&str] = &[
    "honest",
    "honest-shapes",
    "honest-gemma3",
    "cross-numerics",
    "honest-reference",
    "q8_0",
    "q4_0",
    "q2_k",
    "other-model",
    "cost",
    "cost-gemma3",
];

#[derive(Args, Debug)]
pub struct VerifyBenchArgs {
    /// Honest jobs replayed with the same settings (the false-positive figure).
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// Jobs per other scenario (thread and batch shapes, each substitute, gemma3).
    #[arg(long, default_value_t = 100)]
    scenario_jobs: usize,
    /// Jobs replayed on candle's stock engine (one token per pass: slow).
    #[arg(long, default_value_t = 20)]
    reference_jobs: usize,
    /// Jobs of 128 output tokens for the cost figure.
    #[arg(long, default_value_t = 20)]
    cost_jobs: usize,
    /// Most output tokens per job (jobs may end earlier at end of text).
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Run only these scenarios (comma-separated; see the list in docs/verification.md).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also print a markdown table of the results (stderr).
    #[arg(long)]
    markdown: bool,
}

fn model_path(home: &Path, alias: &str, fetch: &dyn Fn(&str) -> Result<()>) -> Result<PathBuf> {
    fetch(alias)?;
    let entry = catalog::find(alias).context("catalogue alias")?;
    Ok(entry.cache_path(home))
}

fn load(path: &Path, name: &str, backend: Backend) -> Result<Model> {
    Model::load_with(path, name, None, backend).with_context(|| format!("loading {name}"))
}

/// How many jobs a scenario runs and how long they are.
struct Workload {
    jobs: usize,
    tokens: u32,
    /// Generate exactly `tokens` (the cost figure) rather than stop at end of text.
    ignore_eos: bool,
}

/// One scenario where the node generates with our engine: what it is and how it runs.
struct Scenario<'a> {
    name: &'a str,
    setup: String,
    /// Whether the node is honest (flagged jobs are then false positives).
    honest: bool,
    work: Workload,
    /// Replay pass sizes, cycled through per job.
    chunks: &'a [usize],
}

/// Generates on `gen` (inside a pool of `gen_threads`) and replays on `auditor`, in
/// passes of `chunks[job % len]` positions; summarises the figures.
fn run_scenario(
    scenario: Scenario<'_>,
    (gen, gen_threads): (&mut Model, usize),
    auditor: &mut Model,
) -> Result<ScenarioReport> {
    let Scenario {
        name,
        setup,
        honest,
        work,
        chunks,
    } = scenario;
    let Workload {
        jobs,
        tokens,
        ignore_eos,
    } = work;
    let mut out = Vec::with_capacity(jobs);
    for job in 0..jobs {
        let (done, gen_ms) = with_threads(gen_threads, || generate(gen, job, tokens, ignore_eos))?;
        let chunk = chunks[job % chunks.len()];
        let (v, replay_ms) = audit(auditor, job, &claim_of(&done), chunk)?;
        progress(name, job, jobs, &v);
        out.push(figure(&v, gen_ms, replay_ms));
    }
    Ok(ScenarioReport::new(name, setup, honest, &out))
}

fn progress(name: &str, job: usize, jobs: usize, v: &tessera_protocol::Verdict) {
    if job % 10 == 9 || job + 1 == jobs || !v.passed {
        eprintln!("  {name} {}/{jobs}: {}", job + 1, v.summary());
    }
}

pub fn verify_bench(
    home: &Path,
    args: VerifyBenchArgs,
    fetch: impl Fn(&str) -> Result<()>,
) -> Result<()> {
    for s in &args.only {
        anyhow::ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}: known scenarios are {}",
            SCENARIOS.join(", ")
        );
    }
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let threads = rayon::current_num_threads();
    let smol_path = model_path(home, "smollm2-135m-instruct", &fetch)?;
    let mut auditor = load(&smol_path, "smollm2-135m-instruct", Backend::Tessera)?;
    let mut reports = Vec::new();
    let mut emit = |r: ScenarioReport| -> Result<()> {
        println!("{}", serde_json::to_string(&r)?);
        reports.push(r);
        Ok(())
    };
    let cpu = cpu_name();
    eprintln!("verify-bench on {cpu}, {threads} threads; auditor: SmolLM2 Q4_1 on our engine, {REPLAY_CHUNK} positions per pass");

    if wanted("honest") {
        let mut gen = load(&smol_path, "smollm2 (honest node)", Backend::Tessera)?;
        let scenario = Scenario {
            name: "honest",
            setup: format!(
                "SmolLM2 Q4_1, node and auditor both on our engine at {threads} threads"
            ),
            honest: true,
            work: Workload {
                jobs: args.jobs,
                tokens: args.tokens,
                ignore_eos: false,
            },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut auditor)?)?;
    }
    if wanted("honest-shapes") {
        let mut gen = load(&smol_path, "smollm2 (1-thread node)", Backend::Tessera)?;
        let scenario = Scenario {
            name: "honest-shapes",
            setup: format!("SmolLM2 Q4_1: node at 1 thread decoding a token per pass; auditor at {threads} threads replaying in passes of 1, 7, 32 and {REPLAY_CHUNK} positions"),
            honest: true,
            work: Workload {
                    jobs: args.scenario_jobs,
                    tokens: args.tokens,
                    ignore_eos: false,
                },
            chunks: &[1, 7, 32, REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, 1), &mut auditor)?)?;
    }
    if wanted("honest-gemma3") {
        let gpath = model_path(home, "gemma3-270m", &fetch)?;
        let mut gen = load(&gpath, "gemma3 (honest node)", Backend::Tessera)?;
        let mut gaud = load(&gpath, "gemma3 (auditor)", Backend::Tessera)?;
        let n = args.scenario_jobs / 2;
        let scenario = Scenario {
            name: "honest-gemma3",
            setup: format!("gemma3-270m Q4_K_M (Gemma turn fallback): node at 1 thread, auditor at {threads} threads in passes of 7 and {REPLAY_CHUNK} positions"),
            honest: true,
            work: Workload {
                    jobs: n,
                    tokens: args.tokens,
                    ignore_eos: false,
                },
            chunks: &[7, REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, 1), &mut gaud)?)?;
    }
    if wanted("cross-numerics") {
        // A node on the previous row kernels (`TESSERA_KERNEL=rows`, read at load, before
        // any engine thread runs), an auditor on the tile kernels: what an audit across
        // numerics would find. Auditors are chosen among nodes of the same numerics.
        std::env::set_var("TESSERA_KERNEL", "rows");
        let gen = load(&smol_path, "smollm2 (row kernels)", Backend::Tessera);
        std::env::remove_var("TESSERA_KERNEL");
        let mut gen = gen?;
        let scenario = Scenario {
            name: "cross-numerics",
            setup: format!("SmolLM2 Q4_1: node on the previous row kernels ({}), auditor on the tile kernels ({})", gen.numerics(), auditor.numerics()),
            honest: true,
            work: Workload {
                jobs: args.reference_jobs,
                tokens: args.tokens,
                ignore_eos: false,
            },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut auditor)?)?;
    }
    if wanted("honest-reference") {
        let mut gen = load(&smol_path, "smollm2 (our engine)", Backend::Tessera)?;
        let mut reference = load(&smol_path, "smollm2 (candle reference)", Backend::Candle)?;
        let scenario = Scenario {
            name: "honest-reference",
            setup: "SmolLM2 Q4_1: node on our engine, auditor on candle's stock quantized_llama (another backend: other kernels, f32 activations)".into(),
            honest: true,
            work: Workload {
                    jobs: args.reference_jobs,
                    tokens: args.tokens,
                    ignore_eos: false,
                },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut reference)?)?;
    }
    for format in ["q8_0", "q4_0", "q2_k"] {
        if !wanted(format) {
            continue;
        }
        let sub = vb::substitute_path(home, &smol_path, format);
        if !sub.exists() {
            eprintln!("requantizing SmolLM2 Q4_1 to {format} at {}", sub.display());
            std::fs::create_dir_all(sub.parent().context("substitute dir")?)?;
            let dtype = tessera_models::requant::parse_format(format).context("format")?;
            let s = tessera_models::requant::requantize(&smol_path, &sub, dtype)?;
            eprintln!(
                "  {} tensors in {format}, {} fell back to q4_0, {} copied",
                s.converted, s.fallback, s.copied
            );
        }
        let mut gen = load(
            &sub,
            &format!("smollm2 {format} (substitute)"),
            Backend::Tessera,
        )?;
        let scenario = Scenario {
            name: format,
            setup: format!("node runs SmolLM2 requantized Q4_1 → {format} (tensors whose width does not split into its blocks fall back to q4_0), claims the Q4_1 module"),
            honest: false,
            work: Workload {
                jobs: args.scenario_jobs,
                tokens: args.tokens,
                ignore_eos: false,
            },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut auditor)?)?;
    }
    if wanted("other-model") {
        let gpath = model_path(home, "gemma3-270m", &fetch)?;
        let mut other = load(&gpath, "gemma3 (substitute)", Backend::Tessera)?;
        let mut figs = Vec::new();
        let jobs = args.scenario_jobs;
        for job in 0..jobs {
            let mut req = tessera_models::GenerateRequest::new(
                Prompt::Text(vb::PROMPTS[job % vb::PROMPTS.len()].into()),
                args.tokens,
            );
            req.sampling = vb::sampling_mix(job);
            let t = std::time::Instant::now();
            let done = other.generate(&req, |_| std::ops::ControlFlow::Continue(()))?;
            let gen_ms = t.elapsed().as_secs_f64() * 1e3;
            let claim = vb::foreign_claim(&auditor, job, &done.text, args.tokens);
            let (v, replay_ms) = audit(&mut auditor, job, &claim, REPLAY_CHUNK)?;
            progress("other-model", job, jobs, &v);
            figs.push(figure(&v, gen_ms, replay_ms));
        }
        emit(ScenarioReport::new(
            "other-model",
            "node runs gemma3-270m on the prompt text and claims its answer, retokenized for SmolLM2, with invented fingerprints".into(),
            false,
            &figs,
        ))?;
    }
    if wanted("cost") {
        let mut gen = load(&smol_path, "smollm2 (honest node)", Backend::Tessera)?;
        let scenario = Scenario {
            name: "cost",
            setup: format!("SmolLM2 Q4_1, 128 output tokens per job, both at {threads} threads: replay time over generation time"),
            honest: true,
            work: Workload {
                    jobs: args.cost_jobs,
                    tokens: 128,
                    ignore_eos: true,
                },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut auditor)?)?;
    }
    if wanted("cost-gemma3") {
        let gpath = model_path(home, "gemma3-270m", &fetch)?;
        let mut gen = load(&gpath, "gemma3 (honest node)", Backend::Tessera)?;
        let mut gaud = load(&gpath, "gemma3 (auditor)", Backend::Tessera)?;
        let scenario = Scenario {
            name: "cost-gemma3",
            setup: format!(
                "gemma3-270m Q4_K_M, 128 output tokens per job, both at {threads} threads"
            ),
            honest: true,
            work: Workload {
                jobs: args.cost_jobs / 2,
                tokens: 128,
                ignore_eos: true,
            },
            chunks: &[REPLAY_CHUNK],
        };
        emit(run_scenario(scenario, (&mut gen, threads), &mut gaud)?)?;
    }
    if args.markdown {
        eprintln!("{}", markdown(&reports, &cpu, threads));
    }
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn markdown(reports: &[ScenarioReport], cpu: &str, threads: usize) -> String {
    let mut s = format!("CPU: {cpu}, {threads} threads\n\n| scenario | jobs | positions | flagged at τ=0.01 / 0.02 / 0.05 / 0.1 / 0.25 | largest distance: median / p99 / max | replay / generation |\n|---|---:|---:|---|---|---:|\n");
    for r in reports {
        let rate = |t: f32| {
            r.flagged
                .iter()
                .find(|(x, _)| (*x - t).abs() < 1e-6)
                .map_or(0.0, |(_, v)| *v)
        };
        let pct = |v: f64| format!("{:.1}%", v * 100.0);
        s.push_str(&format!(
            "| {} | {} | {} | {} / {} / {} / {} / {} | {:.3} / {:.3} / {:.3} | {:.2} |\n",
            r.scenario,
            r.jobs,
            r.positions,
            pct(rate(0.01)),
            pct(rate(0.02)),
            pct(rate(0.05)),
            pct(rate(0.1)),
            pct(rate(0.25)),
            r.distance[1],
            r.distance[2],
            r.distance[3],
            r.replay_over_generate
        ));
    }
    s
}
