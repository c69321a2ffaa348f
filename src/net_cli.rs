//! `tessera node` (serve modules on the network) and `tessera ask` (send one job to a node,
//! the way a coordinator does, to check a node from the command line).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_coordinator::{CoordinatorNet, JobSpec};
use tessera_net::{Multiaddr, NetConfig, PeerId, Protocol};
use tessera_node::{NodeConfig, RunningNode, ServedModel};
use tessera_protocol::{Address, Amount, ChatMessage, JobEvent, JobInput, Price, SamplingParams};

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML config file (flags and environment override it; see docs/network.md).
    #[arg(long, short, env = "TESSERA_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Model to serve: catalogue alias or GGUF path (repeatable; replaces the file's list).
    #[arg(
        long = "model",
        short,
        env = "TESSERA_NODE_MODELS",
        value_delimiter = ','
    )]
    models: Vec<String>,
    /// Test-only adversary: claim this model's module while running --model (needs
    /// TESSERA_TEST_IMPERSONATION=1; audits exist to catch such a node).
    #[arg(long, hide = true, value_name = "MODEL")]
    impersonate: Option<String>,
    /// Price per 1,000 prompt tokens, in base units, for models given with --model.
    #[arg(long, env = "TESSERA_PRICE_INPUT")]
    price_input: Option<Amount>,
    /// Price per 1,000 generated tokens, in base units, for models given with --model.
    #[arg(long, env = "TESSERA_PRICE_OUTPUT")]
    price_output: Option<Amount>,
    #[command(flatten)]
    net: NetFlags,
    /// Most jobs admitted at once (running and waiting) [default: 16].
    #[arg(long, env = "TESSERA_MAX_JOBS")]
    max_jobs: Option<u32>,
    /// Most jobs one engine runs at once, batched step by step [default: 16].
    #[arg(long, env = "TESSERA_MAX_BATCH")]
    max_batch: Option<usize>,
    /// EVM address where earnings are paid.
    #[arg(long, env = "TESSERA_PAYOUT")]
    payout: Option<Address>,
    /// Where the identity key is kept [default: $TESSERA_HOME/node].
    #[arg(long, env = "TESSERA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds between adverts [default: 10].
    #[arg(long, env = "TESSERA_ADVERT_INTERVAL")]
    advert_interval: Option<f64>,
    /// Seconds an advert stays valid [default: 30].
    #[arg(long, env = "TESSERA_ADVERT_TTL")]
    advert_ttl: Option<u32>,
    /// Only accept jobs signed by this coordinator (repeatable; default: any).
    #[arg(
        long = "coordinator",
        env = "TESSERA_COORDINATORS",
        value_delimiter = ','
    )]
    coordinators: Vec<PeerId>,
    /// Seconds in-flight jobs get to finish on Ctrl-C [default: 30].
    #[arg(long, env = "TESSERA_SHUTDOWN_GRACE")]
    shutdown_grace: Option<f64>,
    /// Run a rollup watchtower against this coordinator's settlement (its HTTP URL): replay
    /// every posted batch and challenge a wrong one. Challenges need ether on L1 for the
    /// bond, held by DATA_DIR/watchtower.key.
    #[arg(long, env = "TESSERA_WATCH")]
    watch: Option<String>,
    /// The L1's JSON-RPC URL for the watchtower [default: WATCH/l1, a devnet's chain].
    #[arg(long, env = "TESSERA_L1", requires = "watch")]
    l1: Option<String>,
    /// Serve Prometheus figures at http://ADDR/metrics (e.g. 127.0.0.1:9101).
    #[arg(long, env = "TESSERA_METRICS", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Do not ask the home router for a port mapping (UPnP).
    #[arg(long, env = "TESSERA_NO_UPNP")]
    no_upnp: bool,
    /// Also relay for peers behind NAT (this node needs a public address).
    #[arg(long, env = "TESSERA_RELAY")]
    relay: bool,
    /// Check how peers reach this node, say what to change, and exit (loads no model):
    /// 0 when it is reachable (directly or through a relay), 1 when not.
    #[arg(long)]
    check: bool,
    /// Seconds `--check` waits for the answers (reachability probes, UPnP, the relay).
    #[arg(long, default_value_t = 20.0, requires = "check")]
    check_secs: f64,
}

impl NodeArgs {
    fn into_config(self, home: &Path) -> Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_toml_file(path)?,
            None => NodeConfig {
                data_dir: home.join("node"),
                ..NodeConfig::default()
            },
        };
        if !self.models.is_empty() {
            config.models = self.models.iter().map(ServedModel::new).collect();
        }
        if config.models.is_empty() {
            config
                .models
                .push(ServedModel::new("smollm2-135m-instruct"));
        }
        if let Some(claimed) = &self.impersonate {
            for m in &mut config.models {
                m.impersonate = Some(claimed.clone());
            }
        }
        if self.price_input.is_some() || self.price_output.is_some() {
            for m in &mut config.models {
                m.price = Price {
                    per_1k_input: self.price_input.unwrap_or(m.price.per_1k_input),
                    per_1k_output: self.price_output.unwrap_or(m.price.per_1k_output),
                };
            }
        }
        self.net.apply(&mut config.net)?;
        if let Some(n) = self.max_jobs {
            config.max_jobs = n;
        }
        if let Some(n) = self.max_batch {
            config.engine.max_batch = n;
        }
        if let Some(p) = self.payout {
            config.payout = p;
        }
        if let Some(d) = self.data_dir {
            config.data_dir = d;
        }
        if let Some(s) = self.advert_interval {
            config.advert_interval = Duration::try_from_secs_f64(s)
                .context("--advert-interval must be a positive number of seconds")?;
        }
        if let Some(t) = self.advert_ttl {
            config.advert_ttl_secs = t;
        }
        if let Some(s) = self.shutdown_grace {
            config.shutdown_grace = Duration::try_from_secs_f64(s)
                .context("--shutdown-grace must be a non-negative number of seconds")?;
        }
        config.coordinators.extend(self.coordinators);
        if self.no_upnp {
            config.net.upnp = false;
        }
        if self.relay {
            config.net.relay.serve = true;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Swarm flags nodes and coordinators share; they override the config file's `[net]`.
#[derive(Args, Debug)]
pub struct NetFlags {
    /// Address to listen on (repeatable) [default: TCP and QUIC on 0.0.0.0, port 7400 for
    /// a node, 7300 for a coordinator].
    #[arg(long, env = "TESSERA_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// Peer to join through, ending in /p2p/<peer id> (repeatable).
    #[arg(long, env = "TESSERA_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Address to announce instead of the listen addresses (behind NAT; repeatable).
    #[arg(long, env = "TESSERA_EXTERNAL", value_delimiter = ',')]
    external: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS (implies --lan).
    #[arg(long, env = "TESSERA_MDNS")]
    mdns: bool,
    /// LAN mode: advertise private and loopback addresses too (a LAN or one machine).
    #[arg(long, env = "TESSERA_LAN")]
    lan: bool,
    /// Seconds one relay circuit may stay open (coordinators and --relay nodes) [default: 1800].
    #[arg(long, env = "TESSERA_RELAY_CIRCUIT_SECS")]
    relay_circuit_secs: Option<f64>,
    /// Bytes one relay circuit may carry, both directions [default: 67108864].
    #[arg(long, env = "TESSERA_RELAY_CIRCUIT_BYTES")]
    relay_circuit_bytes: Option<u64>,
}

impl NetFlags {
    /// Applies the flags given: listen replaces, the lists extend, mDNS and LAN mode turn
    /// on, relay limits replace.
    pub fn apply(self, net: &mut NetConfig) -> Result<()> {
        if !self.listen.is_empty() {
            net.listen = self.listen;
        }
        net.bootstrap.extend(self.bootstrap);
        net.external.extend(self.external);
        net.mdns |= self.mdns;
        net.lan |= self.lan;
        if let Some(s) = self.relay_circuit_secs {
            net.relay.max_circuit_duration = Duration::try_from_secs_f64(s)
                .context("--relay-circuit-secs must be a positive number of seconds")?;
        }
        if let Some(b) = self.relay_circuit_bytes {
            net.relay.max_circuit_bytes = b;
        }
        Ok(())
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Ctrl-C and SIGTERM, listened for from the moment it is made (so a signal during start
/// still gets a clean leave).
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot listen for SIGTERM")?,
        })
    }

    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a node until Ctrl-C or SIGTERM.
pub fn node(home: &Path, args: NodeArgs, fetch: impl Fn(&str) -> Result<()>) -> Result<()> {
    let watch = args.watch.clone().map(|url| (url, args.l1.clone()));
    let metrics = args.metrics;
    let check = args.check.then_some(args.check_secs);
    let config = args.into_config(home)?;
    if let Some(secs) = check {
        let wait = Duration::try_from_secs_f64(secs).context("--check-secs must be positive")?;
        return runtime()?.block_on(crate::reach_cli::check(config, wait));
    }
    let tower_key = config.data_dir.join("watchtower.key");
    for m in &config.models {
        fetch(&m.model)?;
    }
    let models = tessera_node::load_models(&config, home)?;
    runtime()?.block_on(async move {
        let mut signals = Signals::new()?;
        let node = {
            // Ctrl-C registers with the runtime when first polled: do it before anything slow.
            let first = signals.recv();
            tokio::pin!(first);
            let node = tokio::select! {
                node = RunningNode::start(config, models) => node.context("cannot start the node")?,
                () = &mut first => bail!("interrupted while starting"),
            };
            let id = node.peer_id();
            eprintln!("node {id} serving:");
            for m in node.modules() {
                eprintln!("  {m}");
            }
            // Give the listeners a moment to bind before printing where they are.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for addr in node.listen_addrs().await {
                if addr.iter().last() == Some(Protocol::P2p(id)) {
                    eprintln!("listening on {addr}");
                } else {
                    eprintln!("listening on {addr}/p2p/{id}");
                }
            }
            let stop = tokio_util::sync::CancellationToken::new();
            if let Some(addr) = metrics {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
                eprintln!("metrics at http://{}/metrics", listener.local_addr()?);
                let (handle, stop) = (node.metrics(), stop.clone());
                tokio::spawn(async move {
                    if let Err(e) = tessera_node::serve_metrics(listener, handle, stop).await {
                        tracing::warn!(error = %e, "metrics server stopped");
                    }
                });
            }
            let tower = match &watch {
                Some((url, l1)) => {
                    let tower =
                        crate::wallet_cli::watchtower(url, l1.as_deref(), &tower_key).await?;
                    Some(tokio::spawn(tower.run(
                        Duration::from_secs(5),
                        None,
                        stop.clone(),
                    )))
                }
                None => None,
            };
            // One line on how peers reach this node, again whenever that changes.
            let mut reach = node.reachability();
            let reach_task = tokio::spawn(async move {
                let mut last = String::new();
                // Not knowing after this long is itself the answer, and it needs a fix.
                let give_up = tokio::time::sleep(Duration::from_secs(30));
                tokio::pin!(give_up);
                let mut waiting = true;
                loop {
                    let line = {
                        let r = reach.borrow_and_update();
                        (r.known() || !waiting).then(|| r.summary())
                    };
                    if let Some(line) = line.filter(|l| *l != last) {
                        let hint = if line.starts_with("not reachable") {
                            " (run `tessera node --check` for what to change)"
                        } else {
                            ""
                        };
                        eprintln!("reachability: {line}{hint}");
                        last = line;
                    }
                    tokio::select! {
                        changed = reach.changed() => if changed.is_err() { break },
                        () = &mut give_up, if waiting => waiting = false,
                    }
                }
            });
            eprintln!("press Ctrl-C to leave the network");
            first.await;
            reach_task.abort();
            (node, stop, tower)
        };
        let (node, stop, tower) = node;
        eprintln!("leaving: finishing in-flight jobs (Ctrl-C again to quit now)");
        stop.cancel();
        if let Some(t) = tower {
            let _ = t.await;
        }
        tokio::select! {
            () = node.shutdown() => Ok(()),
            () = signals.recv() => bail!("quit before in-flight jobs finished"),
        }
    })
}

#[derive(Args, Debug)]
pub struct AskArgs {
    /// The node's address, ending in /p2p/<peer id> (as `tessera node` prints it).
    #[arg(long, env = "TESSERA_ASK_NODE")]
    node: Multiaddr,
    /// Module alias or full module id to run [default: the node's first module].
    #[arg(long, short)]
    model: Option<String>,
    /// The prompt (a user message, or raw text with --raw).
    prompt: String,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds the whole job may take.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Print the signed receipt as JSON on stdout after the text.
    #[arg(long)]
    receipt: bool,
    /// Jobs to send, one after another over the same swarm (see --wait-direct).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=100))]
    jobs: u32,
    /// Before each job after the first, wait up to this many seconds for a direct
    /// connection to the node (hole punching from a relayed one).
    #[arg(long, default_value_t = 0.0)]
    wait_direct: f64,
    /// Print one JSON line per job on stdout (text, usage, timings, the connection that
    /// carried it) instead of the text.
    #[arg(long)]
    json: bool,
}

/// Sends one job to a node and streams its answer.
pub fn ask(args: AskArgs) -> Result<()> {
    let (json, receipt) = (args.json, args.receipt);
    let Some(Protocol::P2p(peer)) = args.node.iter().last() else {
        bail!("--node {} must end in /p2p/<peer id>", args.node);
    };
    let timeout =
        Duration::try_from_secs_f64(args.timeout).context("--timeout must be positive seconds")?;
    runtime()?.block_on(async move {
        // TCP and QUIC, as a coordinator listens: hole punching needs a listen port.
        let config = NetConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse()?,
                "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
            ],
            bootstrap: vec![args.node.clone()],
            ..NetConfig::default()
        };
        let net =
            CoordinatorNet::start(tessera_protocol::Keypair::generate_ed25519(), &config).await?;
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(15);
        let entry = loop {
            if let Some(e) = net.table().read().ok().and_then(|t| t.get(&peer).cloned()) {
                break e;
            }
            if tokio::time::Instant::now() > wait_until {
                bail!(
                    "no advert from {peer} within 15 s: is the node running and reachable at {}?",
                    args.node
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let offer = match &args.model {
            None => entry.advert.modules.first(),
            Some(m) => entry
                .advert
                .modules
                .iter()
                .find(|o| &o.alias == m || &o.module.to_string() == m),
        }
        .with_context(|| {
            let served: Vec<_> = entry
                .advert
                .modules
                .iter()
                .map(|o| o.alias.as_str())
                .collect();
            format!(
                "the node does not serve {:?}; it serves {}",
                args.model.as_deref().unwrap_or(""),
                served.join(", ")
            )
        })?
        .clone();
        let out = AskOutput {
            json,
            receipt,
            advert_addrs: entry.advert.addrs.clone(),
        };
        let input = if args.raw {
            JobInput::Text(args.prompt)
        } else {
            JobInput::Chat(vec![ChatMessage::user(args.prompt)])
        };
        let spec = JobSpec {
            module: offer.module.clone(),
            payer: "cli".into(),
            input,
            sampling: SamplingParams {
                temperature: args.temperature,
                seed: args.seed,
                ..SamplingParams::default()
            },
            max_tokens: args.max_tokens,
            stop: vec![],
            max_price: offer.price,
            timeout,
            replay: None,
        };
        let wait_direct = Duration::try_from_secs_f64(args.wait_direct)
            .context("--wait-direct must be non-negative seconds")?;
        for n in 1..=args.jobs {
            if n > 1 && !wait_direct.is_zero() {
                let until = tokio::time::Instant::now() + wait_direct;
                while tokio::time::Instant::now() < until {
                    let paths = net.net().paths(peer).await.unwrap_or_default();
                    if paths.iter().any(|p| !p.is_relayed()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            run_one(&net, peer, spec.clone(), &out).await?;
        }
        net.shutdown().await;
        Ok(())
    })
}

/// How `tessera ask` prints.
struct AskOutput {
    json: bool,
    receipt: bool,
    /// The node's advertised addresses (in the JSON lines).
    advert_addrs: Vec<String>,
}

/// Runs one job and prints it: the text as it streams (or one JSON line with `--json`).
async fn run_one(net: &CoordinatorNet, peer: PeerId, spec: JobSpec, out: &AskOutput) -> Result<()> {
    use std::io::Write;
    let started = std::time::Instant::now();
    let mut job = net.client().start(peer, spec).await?;
    // The connection a new stream takes: a direct one when there is one.
    let path = net.net().path(peer).await.ok().flatten();
    let mut text = String::new();
    let mut first_token = None;
    let mut result = None;
    while let Some(event) = job.next().await {
        match event? {
            JobEvent::Delta(t) => {
                first_token.get_or_insert_with(|| started.elapsed());
                if !out.json {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(t.as_bytes());
                    let _ = stdout.flush();
                }
                text.push_str(&t);
            }
            JobEvent::Result(r) => result = Some(r),
            JobEvent::Accepted { .. } | JobEvent::Error(_) | JobEvent::Transcript(_) => {}
        }
    }
    let total = started.elapsed();
    let result = result.context("the node ended the job without a result")?;
    let mut stdout = std::io::stdout().lock();
    if out.json {
        let line = serde_json::json!({
            "node": peer.to_string(),
            "text": text,
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "finish_reason": result.finish_reason.as_str(),
            "cost": result.receipt.body.cost,
            "receipt_verified": true,
            "ttft_ms": first_token.map(|d| d.as_secs_f64() * 1e3),
            "total_ms": total.as_secs_f64() * 1e3,
            "path": path.as_ref().map(|p| p.kind()),
            "remote": path.as_ref().map(|p| p.remote().to_string()),
            "advert_addrs": out.advert_addrs,
            "receipt": if out.receipt { serde_json::to_value(&result.receipt)? } else { serde_json::Value::Null },
        });
        let _ = writeln!(stdout, "{line}");
        return Ok(());
    }
    let _ = writeln!(stdout);
    eprintln!(
        "[{} prompt + {} completion tokens, finish {}, ttft {} ms, cost {} base units; receipt signed by {} verified{}]",
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        result.finish_reason.as_str(),
        result.ttft_ms,
        result.receipt.body.cost,
        peer,
        path.map(|p| format!("; over a {} connection to {}", p.kind(), p.remote()))
            .unwrap_or_default()
    );
    if out.receipt {
        let _ = writeln!(stdout, "{}", serde_json::to_string_pretty(&result.receipt)?);
    }
    Ok(())
}
