//! `tessera coordinator` (serve the OpenAI-compatible API over the network) and
//! `tessera devnet` (a coordinator and N nodes on loopback, with a funded API key: the
//! whole system in one command).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::U256;
use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_contracts::{wallet, AnyChain, Contracts, Params, L1};
use tessera_coordinator::{Coordinator, CoordinatorConfig, Ledger, SequencerConfig};
use tessera_net::{Multiaddr, NetConfig, Protocol};
use tessera_node::{NodeConfig, RunningNode, ServedModel, Watchtower};
use tessera_protocol::{Address, Amount};

use crate::net_cli::{NetFlags, Signals};

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML config file (flags and environment override it; see docs/api.md).
    #[arg(long, short, env = "TESSERA_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "TESSERA_HTTP")]
    http: Option<SocketAddr>,
    #[command(flatten)]
    net: NetFlags,
    /// Identity key and ledger directory [default: $TESSERA_HOME/coordinator].
    #[arg(long, env = "TESSERA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Requests per minute per account [default: 600].
    #[arg(long, env = "TESSERA_REQUESTS_PER_MINUTE")]
    requests_per_minute: Option<u32>,
    /// Jobs running at once per account [default: 64].
    #[arg(long, env = "TESSERA_CONCURRENT_JOBS")]
    concurrent_jobs: Option<u32>,
    /// Seconds a request waits for a free node before 503 [default: 30].
    #[arg(long, env = "TESSERA_QUEUE_TIMEOUT")]
    queue_timeout: Option<f64>,
    /// Seconds running jobs get to finish on Ctrl-C [default: 30].
    #[arg(long, env = "TESSERA_SHUTDOWN_GRACE")]
    shutdown_grace: Option<f64>,
    /// Settle through the rollup on this L1: `embedded` (kept in DATA_DIR/l1) or an EVM
    /// node's JSON-RPC URL (the operator key in DATA_DIR/l1/operator.key pays gas).
    #[arg(long, env = "TESSERA_L1")]
    l1: Option<String>,
    /// Seconds between rollup batches [default: 10].
    #[arg(long, env = "TESSERA_BATCH_INTERVAL")]
    batch_interval: Option<f64>,
    /// Seconds an epoch lasts [default: 3600]: statements have a row per epoch, and a
    /// commission change applies from the next one.
    #[arg(long, env = "TESSERA_EPOCH_INTERVAL")]
    epoch_interval: Option<f64>,
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("{flag} must be a non-negative number of seconds"))
}

impl CoordinatorArgs {
    fn into_config(self, home: &Path) -> Result<CoordinatorConfig> {
        let mut c = match &self.config {
            Some(path) => CoordinatorConfig::from_toml_file(path)?,
            None => CoordinatorConfig {
                data_dir: home.join("coordinator"),
                ..CoordinatorConfig::default()
            },
        };
        if let Some(h) = self.http {
            c.http = h;
        }
        self.net.apply(&mut c.net)?;
        if let Some(d) = self.data_dir {
            c.data_dir = d;
        }
        if let Some(n) = self.requests_per_minute {
            c.requests_per_minute = n;
        }
        if let Some(n) = self.concurrent_jobs {
            c.concurrent_jobs = n;
        }
        if let Some(s) = self.queue_timeout {
            c.queue_timeout = secs("--queue-timeout", s)?;
        }
        if let Some(s) = self.shutdown_grace {
            c.shutdown_grace = secs("--shutdown-grace", s)?;
        }
        if let Some(l1) = self.l1 {
            c.settlement.get_or_insert_with(Default::default).l1 = l1;
        }
        if let Some(s) = self.batch_interval {
            let interval = secs("--batch-interval", s)?;
            c.settlement
                .get_or_insert_with(Default::default)
                .batch_interval = interval;
        }
        if let Some(s) = self.epoch_interval {
            let interval = secs("--epoch-interval", s)?;
            c.settlement
                .get_or_insert_with(Default::default)
                .epoch_interval = interval;
        }
        c.validate()?;
        Ok(c)
    }
}

/// A multi-threaded runtime: the API, the jobs and (in a devnet) the nodes share it.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a coordinator until Ctrl-C or SIGTERM.
pub fn coordinator(home: &Path, args: CoordinatorArgs) -> Result<()> {
    let config = args.into_config(home)?;
    runtime()?.block_on(async move {
        let mut signals = Signals::new()?;
        let coordinator = Coordinator::start(config)
            .await
            .context("cannot start the coordinator")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let id = coordinator.peer_id();
        for addr in coordinator.listen_addrs().await {
            eprintln!("nodes join with --bootstrap {addr}/p2p/{id}");
        }
        eprintln!(
            "OpenAI-compatible API on http://{}/v1 (Ctrl-C stops)",
            coordinator.http_addr()
        );
        if coordinator.sequencer().is_some() {
            eprintln!(
                "settling through the rollup; wallets use --coordinator http://{}",
                coordinator.http_addr()
            );
        }
        signals.recv().await;
        eprintln!("stopping: finishing running jobs (Ctrl-C again to quit now)");
        tokio::select! {
            () = coordinator.shutdown() => Ok(()),
            () = signals.recv() => bail!("quit before running jobs finished"),
        }
    })
}

#[derive(Args, Debug)]
pub struct DevnetArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "TESSERA_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Number of nodes.
    #[arg(long, default_value_t = 2,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    nodes: usize,
    /// Where everything is kept: coordinator/ (ledger, identity), node-N/, devnet/api_key
    /// [default: $TESSERA_HOME, so `tessera accounts` finds the devnet's ledger].
    #[arg(long, env = "TESSERA_DEVNET_DIR")]
    data_dir: Option<PathBuf>,
    /// Model the nodes serve: catalogue alias or GGUF path.
    #[arg(long, short, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Tokens (base units) the devnet account deposits on the devnet's L1 when it is
    /// first created.
    #[arg(long, default_value = "1000000000000")]
    fund: Amount,
    /// Seconds a posted batch can be challenged before it is final.
    #[arg(long, default_value_t = 60)]
    challenge_window: u64,
    /// Tokens each new node deposits and stakes as its own bond, so a failed audit's slash
    /// has something to take (0: nodes start unstaked).
    #[arg(long, default_value = "0")]
    node_stake: Amount,
    /// Test-only adversary: the last node runs this model while claiming --model's module
    /// (needs TESSERA_TEST_IMPERSONATION=1).
    #[arg(long, hide = true, value_name = "MODEL")]
    adversary: Option<String>,
    /// Seconds between rollup batches (when anything waits).
    #[arg(long, default_value_t = 10.0)]
    batch_interval: f64,
    /// Seconds an epoch lasts (statements have a row per epoch; a commission change
    /// applies from the next one).
    #[arg(long, default_value_t = 3600.0)]
    epoch_interval: f64,
    /// Most jobs each node admits at once.
    #[arg(long, default_value_t = 16)]
    max_jobs: u32,
    /// Seconds a request waits for a free node before 503 (a devnet is often asked for more
    /// than its few nodes run at once).
    #[arg(long, default_value_t = 120.0)]
    queue_timeout: f64,
}

/// The devnet account's id.
const ACCOUNT: &str = "devnet";

/// Ether the devnet's faucet gives each wallet (gas is free; bonds are not).
const WALLET_ETH: u128 = 10 * 10u128.pow(18);

/// Makes sure the devnet account exists, linked to the devnet wallet's address, and that
/// `key_file` holds a key that authenticates it; returns the key and the tokens to
/// deposit for it on L1 (its funds on first creation; the API balance of a devnet made
/// before settlement, moved to L1 so that L2 holds it).
fn devnet_account(
    ledger_path: &Path,
    key_file: &Path,
    fund: Amount,
    address: &Address,
) -> Result<(String, u128)> {
    let ledger = Ledger::open(ledger_path)?;
    let mut deposit = 0;
    if ledger.balance(ACCOUNT).is_err() {
        ledger.create_account(ACCOUNT)?;
        deposit = fund.0;
        eprintln!("created account {ACCOUNT}; depositing {fund} tokens for it on the devnet L1");
    }
    if ledger.address_of(ACCOUNT)?.as_ref() != Some(address) {
        let balance = ledger.balance(ACCOUNT)?.available();
        if balance.0 > 0 {
            ledger.debit(ACCOUNT, balance)?;
            deposit += balance.0;
        }
        ledger.link(ACCOUNT, address)?;
    }
    if let Ok(key) = std::fs::read_to_string(key_file) {
        let key = key.trim().to_owned();
        if ledger.authenticate(&key).is_ok_and(|a| a == ACCOUNT) {
            return Ok((key, deposit));
        }
        eprintln!(
            "{} does not hold a key of this ledger; issuing a new one",
            key_file.display()
        );
    }
    let key = ledger.create_key(ACCOUNT)?;
    write_secret(key_file, key.expose())?;
    Ok((key.expose().to_owned(), deposit))
}

/// Stakes each node's deposit as its own bond once the sequencer has applied the deposit.
async fn stake_nodes(
    seq: &tessera_coordinator::SequencerHandle,
    deployment: &tessera_contracts::Deployment,
    wallets: &[alloy::signers::local::PrivateKeySigner],
    stakes: &[u128],
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (w, &amount) in wallets.iter().zip(stakes) {
        if amount == 0 {
            continue;
        }
        let address = Address(w.address().0 .0);
        let view = loop {
            if let Some(v) = seq.account(address).await? {
                if v.pending.balance >= amount {
                    break v;
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("the deposit of node {address} never reached L2");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let tx = tessera_rollup::Tx::sign(
            w.credential(),
            &deployment.domain.0,
            view.slot,
            view.pending.nonce,
            tessera_rollup::Action::Stake { amount },
        );
        seq.submit(tx).await?;
        eprintln!("node {address} staked {amount}");
    }
    Ok(())
}

/// Makes sure the account that pays auditors exists and is linked to the audit wallet
/// (its L1 deposits fund it); returns the tokens to deposit for it (on first creation).
fn audit_account(
    ledger_path: &Path,
    account: &str,
    fund: Amount,
    address: &Address,
) -> Result<u128> {
    let ledger = Ledger::open(ledger_path)?;
    let mut deposit = 0;
    if ledger.balance(account).is_err() {
        ledger.create_account(account)?;
        deposit = fund.0;
        eprintln!(
            "created the audit account {account}; depositing {fund} tokens for it on the devnet L1"
        );
    }
    if ledger.address_of(account)?.as_ref() != Some(address) {
        ledger.link(account, address)?;
    }
    Ok(deposit)
}

fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{secret}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn loopback() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr")]
}

/// Runs a coordinator and `--nodes` nodes on loopback until Ctrl-C or SIGTERM.
pub fn devnet(home: &Path, args: DevnetArgs, fetch: impl Fn(&str) -> Result<()>) -> Result<()> {
    let dir = args.data_dir.clone().unwrap_or_else(|| home.to_owned());
    fetch(&args.model)?;
    let coordinator_config = CoordinatorConfig {
        http: args.http,
        data_dir: dir.join("coordinator"),
        net: NetConfig {
            listen: loopback(),
            lan: true,
            ..CoordinatorConfig::default().net
        },
        queue_timeout: secs("--queue-timeout", args.queue_timeout)?,
        ..CoordinatorConfig::default()
    };
    std::fs::create_dir_all(&coordinator_config.data_dir)
        .with_context(|| format!("cannot create {}", coordinator_config.data_dir.display()))?;
    let key_file = dir.join("devnet").join("api_key");
    // Wallets live where `tessera wallet --wallet NAME` finds them (DIR/wallet/NAME.key).
    let (dev_wallet, _) = wallet::load_or_create(&dir.join("wallet").join("devnet.key"))?;
    let (key, deposit) = devnet_account(
        &coordinator_config.ledger_path(),
        &key_file,
        args.fund,
        &Address(dev_wallet.address().0 .0),
    )?;
    // Auditors are paid from an account of their own, funded by a deposit like any other.
    let (audit_wallet, _) = wallet::load_or_create(&dir.join("wallet").join("audits.key"))?;
    let audit_deposit = audit_account(
        &coordinator_config.ledger_path(),
        &coordinator_config.audit.account,
        Amount(args.fund.0 / 10),
        &Address(audit_wallet.address().0 .0),
    )?;
    let mut node_wallets = Vec::new();
    let mut new_nodes = Vec::new();
    for i in 1..=args.nodes {
        let path = dir.join("wallet").join(format!("node-{i}.key"));
        let (w, created) = wallet::load_or_create(&path)?;
        node_wallets.push(w);
        new_nodes.push(created);
    }
    let batch_interval = secs("--batch-interval", args.batch_interval)?;
    let node_configs: Vec<NodeConfig> = (1..=args.nodes)
        .map(|i| NodeConfig {
            data_dir: dir.join(format!("node-{i}")),
            payout: Address(node_wallets[i - 1].address().0 .0),
            models: vec![match &args.adversary {
                // The last node cheats: it runs another model and claims this one.
                Some(other) if i == args.nodes => ServedModel {
                    impersonate: Some(args.model.clone()),
                    ..ServedModel::new(other)
                },
                _ => ServedModel::new(&args.model),
            }],
            max_jobs: args.max_jobs,
            advert_interval: Duration::from_secs(2),
            advert_ttl_secs: 10,
            net: NetConfig {
                listen: loopback(),
                lan: true,
                upnp: false,
                ..NetConfig::default()
            },
            ..NodeConfig::default()
        })
        .collect();
    eprintln!("loading {} on {} nodes", args.model, args.nodes);
    let mut loaded = Vec::new();
    for c in &node_configs {
        loaded.push(tessera_node::load_models(c, home)?);
    }
    runtime()?.block_on(async move {
        let mut signals = Signals::new()?;
        // The devnet's L1: the settlement contracts in an embedded chain kept in DIR/l1.
        let params = Params {
            challenge_window: args.challenge_window,
            escape_delay: (7 * 24 * 3600).max(args.challenge_window * 2),
            ..Params::default()
        };
        let l1 = tessera_coordinator::l1::open_l1(&dir.join("l1"), None, &params)
            .await
            .context("cannot open the devnet's L1")?;
        let AnyChain::Embedded(chain) = l1.chain.clone() else {
            unreachable!("the devnet's L1 is embedded")
        };
        for w in [&dev_wallet, &audit_wallet].into_iter().chain(&node_wallets) {
            if chain.eth_balance(w.address()).await? < U256::from(WALLET_ETH / 2) {
                chain.fund(w.address(), U256::from(WALLET_ETH))?;
            }
        }
        // New nodes get tokens to stake, so that a slash for a failed audit has teeth.
        let stakes: Vec<u128> = new_nodes
            .iter()
            .map(|&new| if new { args.node_stake.0 } else { 0 })
            .collect();
        let funded = [(&dev_wallet, deposit), (&audit_wallet, audit_deposit)]
            .into_iter()
            .chain(node_wallets.iter().zip(stakes.iter().copied()));
        for (w, amount) in funded {
            if amount > 0 {
                let c = Contracts::new(&l1.chain, &l1.deployment);
                c.mint(&l1.operator, w.address(), U256::from(amount)).await?;
                c.deposit(w, w.address(), amount).await?;
            }
        }
        let sequencer = SequencerConfig {
            batch_interval,
            epoch_interval: match secs("--epoch-interval", args.epoch_interval)? {
                d if d < Duration::from_secs(1) => {
                    anyhow::bail!("--epoch-interval must be at least 1 second")
                }
                d => d,
            },
            ..SequencerConfig::default()
        };
        let coordinator = Coordinator::start_with(coordinator_config, Some((l1.clone(), sequencer)))
            .await
            .context("cannot start the coordinator")?;
        if let Some(seq) = coordinator.sequencer() {
            stake_nodes(seq, &l1.deployment, &node_wallets, &stakes).await?;
        }
        // Every node watches the rollup and challenges a wrong batch.
        let towers = tokio_util::sync::CancellationToken::new();
        let mut tower_tasks = Vec::new();
        for w in &node_wallets {
            let tower = Watchtower::new(l1.chain.clone(), l1.deployment.clone(), w.clone());
            tower_tasks.push(tokio::spawn(tower.run(Duration::from_secs(2), None, towers.clone())));
        }
        let id = coordinator.peer_id();
        let mut bootstrap = Vec::new();
        for _ in 0..50 {
            bootstrap = coordinator.listen_addrs().await;
            if !bootstrap.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let bootstrap: Vec<Multiaddr> = bootstrap
            .into_iter()
            .map(|a| a.with(Protocol::P2p(id)))
            .collect();
        let mut nodes = Vec::new();
        for (mut config, models) in node_configs.into_iter().zip(loaded) {
            config.net.bootstrap = bootstrap.clone();
            config.coordinators = vec![id];
            nodes.push(RunningNode::start(config, models).await.context("cannot start a node")?);
        }
        let ready = async {
            loop {
                let n = coordinator.net().table().read().map(|t| t.len()).unwrap_or(0);
                if n >= nodes.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(60), ready) => {
                if r.is_err() {
                    eprintln!("warning: not every node was discovered within 60 s; requests may get 503 until they are");
                }
            }
            () = signals.recv() => bail!("interrupted while starting"),
        }
        // The name callers use: the alias the nodes advertise (a catalogue file keeps its
        // alias even when given by path).
        let alias = coordinator
            .net()
            .table()
            .read()
            .ok()
            .and_then(|t| t.nodes().find_map(|e| e.advert.modules.first().map(|m| m.alias.clone())))
            .unwrap_or_else(|| args.model.clone());
        let base = format!("http://{}/v1", coordinator.http_addr());
        println!("Tessera devnet: a coordinator and {} node(s) serving {alias}", nodes.len());
        println!("base URL: {base}");
        println!("API key:  {key}  (also in {})", key_file.display());
        println!("try:");
        println!(
            "curl -s {base}/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"model\": \"{alias}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Name the capital of France.\"}}], \"max_tokens\": 32, \"temperature\": 0}}'"
        );
        println!(
            "settlement: rollup batches every {:.0} s to {} on the embedded L1 in {} (challenge window {} s)",
            args.batch_interval,
            l1.deployment.settlement,
            dir.join("l1").display(),
            args.challenge_window
        );
        println!(
            "dashboard: http://{}/ (sign in with the API key to see your requests)",
            coordinator.http_addr()
        );
        println!("Ctrl-C stops everything.");
        signals.recv().await;
        eprintln!("stopping the devnet (Ctrl-C again to quit now)");
        let stop = async {
            towers.cancel();
            futures::future::join_all(tower_tasks).await;
            coordinator.shutdown().await;
            futures::future::join_all(nodes.into_iter().map(RunningNode::shutdown)).await;
        };
        tokio::select! {
            () = stop => Ok(()),
            () = signals.recv() => bail!("quit before everything stopped"),
        }
    })
}
