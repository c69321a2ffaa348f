//! The running node: engines for its modules, admission, the job stream handler, adverts,
//! and graceful shutdown. One task accepts job streams and spawns a handler per stream
//! (tracked, cancellable); one task publishes adverts; one task owns the swarm.

use crate::config::{NodeConfig, ServedModel};
use crate::stats::LatencyWindow;
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_models::{
    Engine, EngineHandle, GenerateError, GenerateEvent, GenerateRequest, Model, Prompt,
    ReplayRequest,
};
use tessera_net::{Multiaddr, NetEvent, NetHandle, PeerId, Stream};
use tessera_protocol::job::{MAX_EVENT_FRAME, MAX_REQUEST_FRAME, MAX_TRANSCRIPT_CHUNK};
use tessera_protocol::wire::{read_frame, write_frame};
use tessera_protocol::{
    encode_advert, AdvertStatus, ErrorCode, JobError, JobEvent, JobInput, JobRequest, JobResult,
    Keypair, Load, ModuleId, ModuleOffer, NodeAdvert, Price, Receipt, ReplayClaim, Signed,
    TokenRecord, TranscriptCommitment, Usage, PROTOCOL_VERSION,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A setting is wrong.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] tessera_net::IdentityError),
    /// The swarm could not start.
    #[error(transparent)]
    Net(#[from] tessera_net::NetError),
    /// A model could not be loaded.
    #[error("cannot load {model}: {cause}")]
    Load {
        /// The model as configured.
        model: String,
        /// Why.
        cause: tessera_models::LoadError,
    },
    /// Two configured models are the same module.
    #[error("{0} is configured twice")]
    DuplicateModule(String),
    /// The engine thread could not start.
    #[error("cannot start the engine thread: {0}")]
    Engine(std::io::Error),
    /// The job stream protocol is already being accepted in this process.
    #[error("job protocol already registered")]
    AlreadyAccepting,
}

/// A module being served: its engine, offer and live figures.
struct Served {
    alias: String,
    module: ModuleId,
    price: Price,
    chat_fallback: bool,
    engine: EngineHandle,
    /// Jobs admitted on this engine (it runs one at a time; the rest wait).
    admitted: AtomicU32,
    latency: Mutex<LatencyWindow>,
    /// Its labels in the metrics.
    labels: crate::metrics::ModuleLabels,
}

struct Shared {
    key: Keypair,
    peer_id: PeerId,
    config: NodeConfig,
    served: Vec<Served>,
    admission: Arc<Semaphore>,
    shutting_down: AtomicBool,
    /// Fails in-flight jobs when the shutdown grace runs out.
    abort_jobs: CancellationToken,
    load_changed: Notify,
    seq: AtomicU64,
    publishing: tokio::sync::Mutex<()>,
    net: NetHandle,
    jobs_served: AtomicU64,
    metrics: Arc<crate::metrics::NodeMetrics>,
}

impl Shared {
    /// Where others can dial this node: the addresses confirmed reachable from outside
    /// (`--external`, UPnP, AutoNAT), the `/p2p-circuit` addresses through relays holding
    /// a reservation for it, and in LAN mode its listen addresses. No private address
    /// otherwise: nobody outside could dial it.
    async fn advertised_addrs(&self) -> Vec<String> {
        let reach = self.net.reachability().borrow().clone();
        let mut addrs: Vec<Multiaddr> = self.config.net.external.clone();
        addrs.extend(reach.public);
        addrs.extend(reach.relayed);
        if self.config.net.lan_mode() {
            if let Ok(listen) = self.net.listen_addrs().await {
                addrs.extend(
                    listen
                        .into_iter()
                        .filter(|a| !tessera_net::reachability::is_relayed(a)),
                );
            }
        }
        let mut out: Vec<String> = Vec::new();
        for mut a in addrs {
            // The advert names the node already; without its id a relayed address fits
            // the 128-byte bound.
            if a.iter().last() == Some(tessera_net::Protocol::P2p(self.peer_id)) {
                a.pop();
            }
            let a = a.to_string();
            if a.len() <= tessera_protocol::advert::MAX_NAME_BYTES && !out.contains(&a) {
                out.push(a);
            }
        }
        out.truncate(tessera_protocol::advert::MAX_ADDRS);
        out
    }

    fn load(&self) -> Load {
        let mut load = Load::default();
        for s in &self.served {
            let n = s.admitted.load(Ordering::Relaxed);
            load.running += n.min(1);
            load.waiting += n.saturating_sub(1);
        }
        load
    }

    fn tokens_generated(&self) -> u64 {
        self.served
            .iter()
            .map(|s| s.engine.tokens_generated())
            .sum()
    }

    async fn advert(&self, status: AdvertStatus) -> Option<Vec<u8>> {
        let addrs = self.advertised_addrs().await;
        let advert = NodeAdvert {
            version: PROTOCOL_VERSION,
            node: self.peer_id,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            timestamp_ms: tessera_protocol::now_ms(),
            ttl_secs: self.config.advert_ttl_secs,
            status,
            payout: self.config.payout,
            addrs,
            modules: self
                .served
                .iter()
                .map(|s| ModuleOffer {
                    module: s.module.clone(),
                    alias: s.alias.clone(),
                    price: s.price,
                    latency: s.latency.lock().map(|l| l.stats()).unwrap_or_default(),
                    numerics: s.engine.info().numerics.to_owned(),
                })
                .collect(),
            capacity: self.config.max_jobs,
            load: self.load(),
            tokens_generated: self.tokens_generated(),
        };
        match encode_advert(advert, &self.key) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode advert");
                None
            }
        }
    }

    async fn publish(&self, status: AdvertStatus) {
        // One publisher at a time, and the seq is drawn under the lock: once the goodbye
        // is out, no Online advert (with a higher seq) can follow it.
        let _one = self.publishing.lock().await;
        if status == AdvertStatus::Online && self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        if let Some(bytes) = self.advert(status).await {
            match self.net.publish_advert(bytes).await {
                Ok(()) => tracing::debug!(?status, "advert published"),
                // Normal before any peer has subscribed; the next advert will go out.
                Err(e) => tracing::debug!(error = %e, "advert not published"),
            }
        }
    }
}

/// A node serving its modules on the network, until [`RunningNode::shutdown`].
pub struct RunningNode {
    shared: Arc<Shared>,
    engines: Vec<Engine>,
    jobs: TaskTracker,
    stop: CancellationToken,
    background: TaskTracker,
    net_task: tokio::task::JoinHandle<()>,
}

/// Loads every configured model (blocking: hashing and mapping GGUF files).
pub fn load_models(
    config: &NodeConfig,
    home: &std::path::Path,
) -> Result<Vec<(ServedModel, Model)>, NodeError> {
    config
        .models
        .iter()
        .map(|m| {
            let load_err = |cause| NodeError::Load {
                model: m.model.clone(),
                cause,
            };
            let mut m = m.clone();
            if let Some(claimed) = &m.impersonate {
                if std::env::var(crate::config::IMPERSONATION_ENV).as_deref() != Ok("1") {
                    return Err(NodeError::Config(crate::config::ConfigError::Invalid(format!(
                        "impersonate is a test-only option (a node that claims {claimed} while running {}); it needs {}=1",
                        m.model,
                        crate::config::IMPERSONATION_ENV
                    ))));
                }
                let resolved = tessera_models::resolve(claimed, home).map_err(load_err)?;
                let file = tessera_models::ModelFile::open(&resolved.path).map_err(load_err)?;
                let module = file.module_id(file.weights_hash());
                tracing::warn!(running = %m.model, claiming = %module, "TEST ADVERSARY: this node claims a module it does not run");
                m.impersonated = Some(module);
            }
            tessera_models::load_with(&m.model, home, tessera_models::Backend::default())
                .map(|model| (m, model))
                .map_err(load_err)
        })
        .collect()
}

impl RunningNode {
    /// Starts the engines, the swarm, the job acceptor and the advertiser.
    pub async fn start(
        config: NodeConfig,
        models: Vec<(ServedModel, Model)>,
    ) -> Result<Self, NodeError> {
        config.validate()?;
        let (key, created) =
            tessera_net::load_or_create_identity(&config.data_dir.join("identity.key"))?;
        let peer_id = key.public().to_peer_id();
        if created {
            tracing::info!(%peer_id, dir = %config.data_dir.display(), "created node identity");
        }
        let mut engines = Vec::new();
        let mut served: Vec<Served> = Vec::new();
        for (cfg, model) in models {
            let module = cfg
                .impersonated
                .clone()
                .unwrap_or_else(|| model.module_id().clone());
            if served.iter().any(|s| s.module == module) {
                return Err(NodeError::DuplicateModule(module.to_string()));
            }
            // A catalogue file keeps its alias even when given by path.
            let alias = tessera_models::catalog::find(&cfg.model)
                .or_else(|| {
                    tessera_models::CATALOG
                        .iter()
                        .find(|e| e.blake3 == module.weights.to_hex())
                })
                .map(|e| e.alias.to_owned())
                .unwrap_or_else(|| {
                    std::path::Path::new(&cfg.model)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| cfg.model.clone())
                });
            let engine = Engine::spawn(
                model,
                tessera_models::BatchConfig {
                    queue: config.max_jobs as usize,
                    ..config.engine
                },
            )
            .map_err(NodeError::Engine)?;
            served.push(Served {
                labels: crate::metrics::ModuleLabels {
                    model: alias.clone(),
                    module: module.to_string(),
                },
                alias,
                module,
                price: cfg.price,
                chat_fallback: cfg.chat_fallback,
                engine: engine.handle(),
                admitted: AtomicU32::new(0),
                latency: Mutex::new(LatencyWindow::default()),
            });
            engines.push(engine);
        }
        let (net, mut net_events, net_task) = tessera_net::start(key.clone(), &config.net).await?;
        let mut control = net.control();
        let mut incoming = control
            .accept(tessera_net::job_protocol())
            .map_err(|_| NodeError::AlreadyAccepting)?;
        let metrics = Arc::new(crate::metrics::NodeMetrics::with_net(net.metrics()));
        let shared = Arc::new(Shared {
            key,
            peer_id,
            admission: Arc::new(Semaphore::new(config.max_jobs as usize)),
            config,
            served,
            shutting_down: AtomicBool::new(false),
            abort_jobs: CancellationToken::new(),
            load_changed: Notify::new(),
            seq: AtomicU64::new(tessera_protocol::now_ms()),
            publishing: tokio::sync::Mutex::new(()),
            net,
            jobs_served: AtomicU64::new(0),
            metrics,
        });
        let jobs = TaskTracker::new();
        let background = TaskTracker::new();
        let stop = CancellationToken::new();

        // Acceptor: a tight loop that hands each stream to its own task (libp2p-stream drops
        // inbound streams when the acceptor lags). Streams still sending their request are
        // bounded too, so idle streams cannot pile up tasks.
        {
            let shared = shared.clone();
            let jobs = jobs.clone();
            let stop = stop.clone();
            let handlers = Arc::new(Semaphore::new(shared.config.max_jobs as usize * 4 + 16));
            background.spawn(async move {
                loop {
                    tokio::select! {
                        next = incoming.next() => match next {
                            Some((peer, stream)) => match handlers.clone().try_acquire_owned() {
                                Ok(permit) => {
                                    let shared = shared.clone();
                                    jobs.spawn(async move {
                                        handle_stream(shared, peer, stream).await;
                                        drop(permit);
                                    });
                                }
                                Err(_) => {
                                    tracing::warn!(%peer, "too many open job streams; dropping a new one");
                                    drop(stream);
                                }
                            },
                            None => break,
                        },
                        () = stop.cancelled() => break,
                    }
                }
            });
        }
        // Advertiser: on every interval, load change, or new subscriber.
        {
            let shared = shared.clone();
            let stop = stop.clone();
            let subscriber = Arc::new(Notify::new());
            let notify = subscriber.clone();
            let events_stop = stop.clone();
            background.spawn(async move {
                loop {
                    tokio::select! {
                        event = net_events.recv() => match event {
                            Some(NetEvent::AdvertSubscriber { peer }) => {
                                tracing::debug!(%peer, "new advert subscriber");
                                notify.notify_one();
                            }
                            Some(NetEvent::Connected { peer, addr }) => tracing::info!(%peer, %addr, "peer connected"),
                            Some(NetEvent::Disconnected { peer }) => tracing::info!(%peer, "peer disconnected"),
                            Some(_) => {}
                            None => break,
                        },
                        () = events_stop.cancelled() => break,
                    }
                }
            });
            background.spawn(async move {
                let mut tick = tokio::time::interval(shared.config.advert_interval);
                let mut reach = shared.net.reachability();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = shared.load_changed.notified() => {}
                        () = subscriber.notified() => {}
                        // New addresses (a relay reservation, a confirmed or lost address) go
                        // out at once, so dialers learn them within about a second.
                        changed = reach.changed() => if changed.is_err() { break },
                        () = stop.cancelled() => break,
                    }
                    // Once leaving, only the goodbye goes out: an Online advert now would
                    // put the node back into routing tables.
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        break;
                    }
                    shared.publish(AdvertStatus::Online).await;
                    // Coalesce bursts of load changes into one advert.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Ok(Self {
            shared,
            engines,
            jobs,
            stop,
            background,
            net_task,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared.net.listen_addrs().await.unwrap_or_default()
    }

    /// How peers reach this node, kept current (print its summary to the operator).
    pub fn reachability(&self) -> tokio::sync::watch::Receiver<tessera_net::Reachability> {
        self.shared.net.reachability()
    }

    /// The modules served.
    pub fn modules(&self) -> Vec<ModuleId> {
        self.shared
            .served
            .iter()
            .map(|s| s.module.clone())
            .collect()
    }

    /// Tokens generated since start, over all modules.
    pub fn tokens_generated(&self) -> u64 {
        self.shared.tokens_generated()
    }

    /// A handle that renders the node's Prometheus figures (for `/metrics`).
    pub fn metrics(&self) -> MetricsHandle {
        MetricsHandle(self.shared.clone())
    }

    /// Stops admitting jobs (new ones are answered "shutting down"), says goodbye on the
    /// network, lets in-flight jobs finish within the grace period and fails the rest, then
    /// stops the swarm and the engines.
    pub async fn shutdown(self) {
        let shared = &self.shared;
        shared.shutting_down.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: no new jobs");
        shared.publish(AdvertStatus::Leaving).await;
        self.jobs.close();
        if tokio::time::timeout(shared.config.shutdown_grace, self.jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?shared.config.shutdown_grace, "jobs still running after the grace period; failing them");
            shared.abort_jobs.cancel();
            // Every job now ends within one write timeout; never wait longer than that.
            let _ = tokio::time::timeout(WRITE_TIMEOUT * 2, self.jobs.wait()).await;
        }
        // Let the goodbye and the last replies leave before the connections close.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.cancel();
        self.background.close();
        self.background.wait().await;
        shared.net.shutdown().await;
        let _ = self.net_task.await;
        let engines = self.engines;
        let _ = tokio::task::spawn_blocking(move || engines.into_iter().for_each(Engine::shutdown))
            .await;
        tracing::info!(
            jobs = shared.jobs_served.load(Ordering::Relaxed),
            "node stopped"
        );
    }
}

/// Renders a running node's Prometheus figures; cheap to clone.
#[derive(Clone)]
pub struct MetricsHandle(Arc<Shared>);

impl MetricsHandle {
    /// The text exposition, with each module's queue as of now.
    pub fn render(&self) -> String {
        for s in &self.0.served {
            let n = s.admitted.load(Ordering::Relaxed);
            self.0
                .metrics
                .queue(&s.labels, n.min(1), n.saturating_sub(1));
        }
        self.0.metrics.render()
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: MetricsHandle,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    m.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// A job that passed admission and holds a slot.
struct Admitted {
    request: JobRequest,
    coordinator: PeerId,
    /// The peer whose stream carries the job.
    peer: PeerId,
    module: usize,
    _permit: OwnedSemaphorePermit,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> JobError {
    JobError::new(code, message)
}

/// Checks a request in the order that costs least first; every refusal says why.
fn admit(shared: &Shared, peer: PeerId, signed: Signed<JobRequest>) -> Result<Admitted, JobError> {
    let coordinator = signed
        .verify()
        .map_err(|e| reject(ErrorCode::BadSignature, format!("job request: {e}")))?;
    let request = signed.body;
    if request.node != shared.peer_id {
        return Err(reject(
            ErrorCode::BadSignature,
            format!(
                "job is addressed to node {}, this is {}",
                request.node, shared.peer_id
            ),
        ));
    }
    if !shared.config.coordinators.is_empty() && !shared.config.coordinators.contains(&coordinator)
    {
        return Err(reject(
            ErrorCode::Unauthorized,
            format!("coordinator {coordinator} is not on this node's list"),
        ));
    }
    request.check_bounds()?;
    if request.deadline_ms <= tessera_protocol::now_ms() {
        return Err(reject(
            ErrorCode::DeadlineExceeded,
            "the job's deadline has passed",
        ));
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        return Err(reject(ErrorCode::ShuttingDown, "node is shutting down"));
    }
    let module = shared
        .served
        .iter()
        .position(|s| s.module == request.module)
        .ok_or_else(|| {
            reject(
                ErrorCode::UnknownModule,
                format!("this node does not serve {}", request.module),
            )
        })?;
    let served = &shared.served[module];
    if !served.price.within(&request.max_price) {
        return Err(reject(
            ErrorCode::PriceTooHigh,
            format!(
                "price is {}/{} per 1k input/output tokens, above the maximum {}/{}",
                served.price.per_1k_input,
                served.price.per_1k_output,
                request.max_price.per_1k_input,
                request.max_price.per_1k_output
            ),
        ));
    }
    let permit = shared.admission.clone().try_acquire_owned().map_err(|_| {
        reject(
            ErrorCode::Busy,
            format!("node is at capacity ({} jobs)", shared.config.max_jobs),
        )
    })?;
    Ok(Admitted {
        request,
        coordinator,
        peer,
        module,
        _permit: permit,
    })
}

/// Longest a frame may take to leave: a client that stops reading (its flow-control window
/// full) must not hold a job slot, the engine, or shutdown forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn send(writer: &mut WriteHalf<Stream>, event: &JobEvent) -> bool {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame(writer, event, MAX_EVENT_FRAME)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "job stream write failed");
            false
        }
        Err(_) => {
            tracing::info!("client stopped reading for {WRITE_TIMEOUT:?}; dropping the job stream");
            false
        }
    }
}

async fn fail(writer: &mut WriteHalf<Stream>, error: JobError) {
    tracing::info!(code = ?error.code, message = %error.message, "job refused");
    if send(writer, &JobEvent::Error(error)).await {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, writer.close()).await;
    }
}

async fn handle_stream(shared: Arc<Shared>, peer: PeerId, stream: Stream) {
    // Which path carries the stream is best told the moment it arrives.
    let circuit = relay_budget(&shared, peer).await;
    let (mut reader, mut writer) = stream.split();
    if shared.shutting_down.load(Ordering::SeqCst) {
        // No need to read the request to answer it.
        return fail(
            &mut writer,
            reject(ErrorCode::ShuttingDown, "node is shutting down"),
        )
        .await;
    }
    let read = tokio::select! {
        read = tokio::time::timeout(
            shared.config.request_timeout,
            read_frame::<_, Signed<JobRequest>>(&mut reader, MAX_REQUEST_FRAME),
        ) => read,
        () = shared.abort_jobs.cancelled() => return,
    };
    let signed = match read {
        Ok(Ok(Some(signed))) => signed,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad job frame");
            return fail(&mut writer, reject(ErrorCode::BadRequest, e.to_string())).await;
        }
        Err(_) => {
            return fail(
                &mut writer,
                reject(
                    ErrorCode::BadRequest,
                    format!("no job request within {:?}", shared.config.request_timeout),
                ),
            )
            .await
        }
    };
    let span = tracing::info_span!("job", job_id = %signed.body.job_id, %peer);
    async move {
        match admit(&shared, peer, signed) {
            Ok(admitted) => run_job(&shared, admitted, circuit, reader, writer).await,
            Err(e) => fail(&mut writer, e).await,
        }
    }
    .instrument(span)
    .await
}

fn engine_error(e: GenerateError) -> JobError {
    let code = match &e {
        GenerateError::PromptTooLong { .. } => ErrorCode::PromptTooLong,
        GenerateError::EmptyPrompt
        | GenerateError::BadToken(..)
        | GenerateError::Sampling(_)
        | GenerateError::BadStop { .. }
        | GenerateError::Chat(_) => ErrorCode::BadRequest,
        GenerateError::Cancelled => ErrorCode::Cancelled,
        GenerateError::EngineGone | GenerateError::Candle(_) => ErrorCode::Internal,
    };
    JobError::new(code, e.to_string())
}

async fn run_job(
    shared: &Shared,
    job: Admitted,
    circuit: Option<tessera_net::CircuitBudget>,
    mut reader: ReadHalf<Stream>,
    mut writer: WriteHalf<Stream>,
) {
    let served = &shared.served[job.module];
    let request = &job.request;
    let started = Instant::now();
    let started_ms = tessera_protocol::now_ms();
    let prompt = match &request.input {
        JobInput::Text(t) => Prompt::Text(t.clone()),
        JobInput::Chat(m) => Prompt::Chat(m.clone()),
    };
    if circuit
        .as_ref()
        .is_some_and(|b| b.must_end(Instant::now(), 0, TRANSCRIPT_BYTES_PER_TOKEN))
    {
        let _ = shared.net.close_spent_circuits(job.peer).await;
        return fail(
            &mut writer,
            reject(
                ErrorCode::Busy,
                "the relay circuit carrying this job is nearly spent; send it again (it will take a new circuit or a direct connection)",
            ),
        )
        .await;
    }
    if let Some(claim) = &request.replay {
        return run_replay(shared, &job, prompt, claim.clone(), writer).await;
    }
    let generate = GenerateRequest {
        prompt,
        sampling: request.sampling.clone(),
        max_tokens: request.max_tokens,
        stop: request.stop.clone(),
        chat_fallback: served.chat_fallback,
        ignore_eos: false,
    };
    let queued = served.admitted.fetch_add(1, Ordering::SeqCst);
    shared.load_changed.notify_one();
    let _slot = SlotGuard { shared, served };
    let mut events = match served.engine.try_generate(generate) {
        Ok(Some(events)) => events,
        Ok(None) => {
            shared.metrics.outcome(&served.alias, "busy");
            return fail(&mut writer, reject(ErrorCode::Busy, "engine queue is full")).await;
        }
        Err(e) => {
            shared.metrics.outcome(&served.alias, "failed");
            return fail(&mut writer, engine_error(e)).await;
        }
    };
    tracing::info!(job_id = %request.job_id, module = %served.alias, queued, "job admitted");
    if !send(&mut writer, &JobEvent::Accepted { queued }).await {
        return;
    }
    let deadline_in = Duration::from_millis(
        request
            .deadline_ms
            .saturating_sub(tessera_protocol::now_ms()),
    );
    let deadline = tokio::time::sleep(deadline_in);
    tokio::pin!(deadline);
    // The client sends nothing after its request. When it closes its side cleanly (end of
    // stream), it cancels the job but still wants the receipt for what was delivered: the
    // engine stops after the current token and the job ends with a `cancelled` result.
    // When the stream breaks instead, nobody is left to receive anything: stop at once.
    let mut probe = [0u8; 1];
    let peer_gone = reader.read(&mut probe);
    tokio::pin!(peer_gone);
    let mut cancelling = false;
    let mut first_token: Option<Instant> = None;
    // A job carried by a relay circuit ends cleanly, with a receipt, before the relay's
    // time or byte limit would cut it (docs/network.md, "Relay limits"). Checked twice a
    // second, off the token path: the margins hold far more than half a second of tokens.
    let mut interrupted = false;
    let mut deltas: u64 = 0;
    let mut circuit_check = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(500),
        Duration::from_millis(500),
    );
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Ok(GenerateEvent::Delta(text))) => {
                    first_token.get_or_insert_with(Instant::now);
                    deltas += 1;
                    if !send(&mut writer, &JobEvent::Delta(text)).await {
                        tracing::info!(job_id = %request.job_id, "stream closed by the client; generation stopped");
                        return;
                    }
                }
                Some(Ok(GenerateEvent::Done(mut done))) => {
                    if interrupted && done.finish_reason == tessera_protocol::FinishReason::Cancelled {
                        done.finish_reason = tessera_protocol::FinishReason::Interrupted;
                    }
                    if interrupted {
                        let _ = shared.net.close_spent_circuits(job.peer).await;
                    }
                    let ttft = first_token.unwrap_or_else(Instant::now).duration_since(started);
                    let usage = Usage {
                        prompt_tokens: done.prompt_tokens,
                        completion_tokens: done.completion_tokens,
                    };
                    let receipt = match sign_receipt(shared, &job, usage, done.finish_reason, done.commitment, started_ms, None) {
                        Ok(r) => r,
                        Err(e) => return fail(&mut writer, e).await,
                    };
                    let decode_ms = done.timings.decode.as_millis().min(u128::from(u32::MAX)) as u32;
                    let ttft_ms = ttft.as_millis().min(u128::from(u32::MAX)) as u32;
                    let tpot_us = (done.timings.decode_tokens > 0).then(|| {
                        (done.timings.decode.as_micros() / u128::from(done.timings.decode_tokens)).min(u128::from(u32::MAX)) as u32
                    });
                    if let Ok(mut l) = served.latency.lock() {
                        l.record(ttft_ms, tpot_us);
                    }
                    shared.metrics.job_done(
                        &served.labels,
                        match done.finish_reason {
                            tessera_protocol::FinishReason::Cancelled => "cancelled",
                            tessera_protocol::FinishReason::Interrupted => "interrupted",
                            _ => "ok",
                        },
                        ttft,
                        tpot_us.filter(|t| *t > 0).map(|t| 1e6 / f64::from(t)),
                        usage.completion_tokens,
                        receipt.body.cost.0,
                    );
                    let result = JobResult {
                        usage,
                        finish_reason: done.finish_reason,
                        commitment: done.commitment,
                        ttft_ms,
                        decode_ms,
                        receipt,
                    };
                    shared.jobs_served.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(job_id = %request.job_id, tokens = usage.completion_tokens, ttft_ms, "job done");
                    if !send_transcript(&mut writer, &done.transcript).await {
                        return;
                    }
                    if send(&mut writer, &JobEvent::Result(Box::new(result))).await {
                        let _ = writer.close().await;
                    }
                    return;
                }
                Some(Err(GenerateError::Cancelled)) if interrupted => {
                    // Stopped before its first token: nothing to bill, and worth sending again.
                    shared.metrics.outcome(&served.alias, "interrupted");
                    let _ = shared.net.close_spent_circuits(job.peer).await;
                    return fail(&mut writer, reject(ErrorCode::Busy, "the relay circuit carrying this job ran out before its first token; send it again")).await;
                }
                Some(Err(e)) => {
                    shared.metrics.outcome(&served.alias, "failed");
                    return fail(&mut writer, engine_error(e)).await;
                }
                None => {
                    shared.metrics.outcome(&served.alias, "failed");
                    return fail(&mut writer, reject(ErrorCode::Internal, "the engine dropped the job")).await;
                }
            },
            () = &mut deadline => {
                return fail(&mut writer, reject(ErrorCode::DeadlineExceeded, "deadline reached while generating")).await;
            }
            _ = circuit_check.tick(), if circuit.is_some() && !cancelling => {
                if circuit.as_ref().is_some_and(|b| b.must_end(Instant::now(), deltas, TRANSCRIPT_BYTES_PER_TOKEN)) {
                    tracing::warn!(job_id = %request.job_id, tokens = deltas, "the relay circuit is near its limit; ending the job with a receipt for what was sent");
                    events.stop();
                    cancelling = true;
                    interrupted = true;
                }
            }
            read = &mut peer_gone, if !cancelling => {
                if matches!(read, Ok(0)) {
                    tracing::info!(job_id = %request.job_id, "cancelled by the client; stopping after this token");
                    events.stop();
                    cancelling = true;
                } else {
                    tracing::info!(job_id = %request.job_id, "stream broken by the client; generation stopped");
                    return;
                }
            }
            () = shared.abort_jobs.cancelled() => {
                return fail(&mut writer, reject(ErrorCode::ShuttingDown, "node shut down before the job finished")).await;
            }
        }
    }
}

/// Bytes a generated token adds to the end of a job (its transcript record, framed and
/// encrypted, with room to spare): kept free on a relay circuit for the transcript.
const TRANSCRIPT_BYTES_PER_TOKEN: u64 = 128;

/// The limits of the relay circuit carrying `peer`'s stream, asked as the stream arrives:
/// none when a direct connection is up (openers put new streams on it), else the tightest
/// of the relayed connections whose relay set limits.
async fn relay_budget(shared: &Shared, peer: PeerId) -> Option<tessera_net::CircuitBudget> {
    let paths = shared.net.paths(peer).await.ok()?;
    if paths.iter().any(|p| !p.is_relayed()) {
        return None;
    }
    let now = Instant::now();
    paths
        .into_iter()
        .filter_map(|p| match p {
            tessera_net::Path::Relayed {
                budget: Some(b), ..
            } if b.duration.is_some() || b.bytes_limit.is_some() => Some(b),
            _ => None,
        })
        .min_by_key(|b| {
            (
                b.bytes_left().unwrap_or(u64::MAX),
                b.time_left(now).unwrap_or(Duration::MAX),
            )
        })
}

/// The node-signed receipt of a finished job or audit: its price applied to `usage`.
fn sign_receipt(
    shared: &Shared,
    job: &Admitted,
    usage: Usage,
    finish_reason: tessera_protocol::FinishReason,
    commitment: TranscriptCommitment,
    started_ms: u64,
    verdict: Option<tessera_protocol::Verdict>,
) -> Result<Signed<Receipt>, JobError> {
    let served = &shared.served[job.module];
    let request = &job.request;
    let cost = served
        .price
        .cost(usage.prompt_tokens, usage.completion_tokens)
        .ok_or_else(|| reject(ErrorCode::Internal, "cost overflows"))?;
    let receipt = Receipt {
        job_id: request.job_id,
        node: shared.peer_id,
        coordinator: job.coordinator,
        payer: request.payer.clone(),
        module: served.module.clone(),
        input_hash: request.input.hash(),
        sampling: request.sampling.clone(),
        usage,
        finish_reason,
        price: served.price,
        cost,
        commitment,
        started_ms,
        finished_ms: tessera_protocol::now_ms(),
        verdict,
    };
    Signed::sign(receipt, &shared.key).map_err(|e| reject(ErrorCode::Internal, e.to_string()))
}

/// Sends a transcript in frames of at most [`MAX_TRANSCRIPT_CHUNK`] records.
async fn send_transcript(writer: &mut WriteHalf<Stream>, records: &[TokenRecord]) -> bool {
    for chunk in records.chunks(MAX_TRANSCRIPT_CHUNK) {
        if !send(writer, &JobEvent::Transcript(chunk.to_vec())).await {
            return false;
        }
    }
    true
}

/// An audit: replay the claimed transcript on this module's engine, stream the replay's
/// own records, and sign a receipt that carries the verdict. Priced as input tokens.
async fn run_replay(
    shared: &Shared,
    job: &Admitted,
    prompt: Prompt,
    claim: ReplayClaim,
    mut writer: WriteHalf<Stream>,
) {
    let served = &shared.served[job.module];
    let request = &job.request;
    let started_ms = tessera_protocol::now_ms();
    let queued = served.admitted.fetch_add(1, Ordering::SeqCst);
    shared.load_changed.notify_one();
    let _slot = SlotGuard { shared, served };
    tracing::info!(job_id = %request.job_id, module = %served.alias, records = claim.records.len(), "audit admitted");
    if !send(&mut writer, &JobEvent::Accepted { queued }).await {
        return;
    }
    let replay = served.engine.replay(ReplayRequest {
        prompt,
        chat_fallback: served.chat_fallback,
        sampling: request.sampling.clone(),
        claim,
    });
    let deadline = tokio::time::sleep(Duration::from_millis(
        request
            .deadline_ms
            .saturating_sub(tessera_protocol::now_ms()),
    ));
    let replayed = tokio::select! {
        r = replay => r,
        () = deadline => {
            return fail(&mut writer, reject(ErrorCode::DeadlineExceeded, "deadline reached while replaying")).await;
        }
        () = shared.abort_jobs.cancelled() => {
            return fail(&mut writer, reject(ErrorCode::ShuttingDown, "node shut down before the replay finished")).await;
        }
    };
    let replayed = match replayed {
        Ok(r) => r,
        Err(e) => return fail(&mut writer, engine_error(e)).await,
    };
    let usage = Usage {
        prompt_tokens: replayed
            .prompt_tokens
            .saturating_add(replayed.verdict.positions),
        completion_tokens: 0,
    };
    let commitment = TranscriptCommitment::from_records(&replayed.records);
    let replay_ms = replayed.verdict.replay_ms;
    shared.metrics.replay(replayed.verdict.passed);
    tracing::info!(job_id = %request.job_id, verdict = %replayed.verdict.summary(), "audit done");
    let receipt = match sign_receipt(
        shared,
        job,
        usage,
        tessera_protocol::FinishReason::Stop,
        commitment,
        started_ms,
        Some(replayed.verdict),
    ) {
        Ok(r) => r,
        Err(e) => return fail(&mut writer, e).await,
    };
    let result = JobResult {
        usage,
        finish_reason: tessera_protocol::FinishReason::Stop,
        commitment,
        ttft_ms: replay_ms,
        decode_ms: 0,
        receipt,
    };
    shared.jobs_served.fetch_add(1, Ordering::Relaxed);
    if !send_transcript(&mut writer, &replayed.records).await {
        return;
    }
    if send(&mut writer, &JobEvent::Result(Box::new(result))).await {
        let _ = writer.close().await;
    }
}

/// Gives a job's engine slot back however the job ends.
struct SlotGuard<'a> {
    shared: &'a Shared,
    served: &'a Served,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.served.admitted.fetch_sub(1, Ordering::SeqCst);
        self.shared.load_changed.notify_one();
    }
}
