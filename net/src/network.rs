//! The task that owns the swarm, the handle that talks to it, and the events it reports.

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::circuits::{self, CircuitBudget, Unclaimed};
use crate::config::NetConfig;
use crate::metrics::NetMetrics;
use crate::reachability::{is_private, is_relayed, Reachability, UpnpStatus};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::{ConnectedPoint, Transport};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    autonat, dcutr, gossipsub, identify, identity::Keypair, mdns, noise, ping, relay, tcp, upnp,
    yamux, Multiaddr, PeerId, Swarm,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_protocol::{decode_advert, AdvertError, NodeAdvert, ADVERTS_TOPIC};
use tokio::sync::{mpsc, oneshot, watch};

/// Commands waiting for the swarm task.
const COMMAND_BUFFER: usize = 64;
/// Events waiting for the owner; beyond this the oldest news is dropped, not the swarm.
const EVENT_BUFFER: usize = 256;
/// Relays a peer behind NAT holds reservations on at once.
const MAX_RELAYS: usize = 2;
/// Circuit limits heard of before their connection is up; beyond this the oldest go.
const MAX_PENDING_LIMITS: usize = 256;
/// How long a circuit's limit waits for its connection before it is taken for stale.
const PENDING_LIMIT_TTL: Duration = Duration::from_secs(10);
/// Observed and unreachable addresses kept for the operator.
const MAX_NOTED_ADDRS: usize = 4;

/// How a connection to a peer runs.
#[derive(Clone, Debug)]
pub enum Path {
    /// Straight to the peer's address (public, forwarded, or punched through NAT).
    Direct {
        /// The peer's address on this connection.
        remote: Multiaddr,
        /// Made by hole punching from a relayed connection.
        upgraded: bool,
    },
    /// Through a relay circuit.
    Relayed {
        /// The circuit address.
        remote: Multiaddr,
        /// What the relay lets the circuit carry (`None`: not known).
        budget: Option<CircuitBudget>,
    },
}

impl Path {
    /// Whether the connection runs through a relay.
    pub fn is_relayed(&self) -> bool {
        matches!(self, Path::Relayed { .. })
    }

    /// The peer's address on this connection.
    pub fn remote(&self) -> &Multiaddr {
        match self {
            Path::Direct { remote, .. } | Path::Relayed { remote, .. } => remote,
        }
    }

    /// `direct`, `upgraded` or `relayed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Path::Direct { upgraded: true, .. } => "upgraded",
            Path::Direct { .. } => "direct",
            Path::Relayed { .. } => "relayed",
        }
    }
}

struct ConnInfo {
    peer: PeerId,
    remote: Multiaddr,
    relayed: bool,
    upgraded: bool,
    budget: Option<CircuitBudget>,
    /// When a spent circuit is closed (once the last frames of its job have left).
    retire_at: Option<Instant>,
}

/// How long a spent circuit stays open for the last frames of its job.
const RETIRE_GRACE: Duration = Duration::from_secs(2);

impl ConnInfo {
    fn kind(&self) -> &'static str {
        match (self.relayed, self.upgraded) {
            (true, _) => "relayed",
            (false, true) => "upgraded",
            (false, false) => "direct",
        }
    }
}

/// What the swarm reports to its owner.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A valid, signed, current advert (already checked against its gossip author).
    Advert(Box<NodeAdvert>),
    /// A connection to `peer` is up (the first one).
    Connected {
        /// The peer.
        peer: PeerId,
        /// The address of the connection.
        addr: Multiaddr,
    },
    /// The last connection to `peer` closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// `peer` told us who it is.
    Identified {
        /// The peer.
        peer: PeerId,
        /// Its agent string (`tessera/0.1.0`).
        agent: String,
        /// Addresses it listens on.
        listen_addrs: Vec<Multiaddr>,
    },
    /// A ping round trip to `peer`.
    Rtt {
        /// The peer.
        peer: PeerId,
        /// Round-trip time.
        rtt: Duration,
    },
    /// `peer` subscribed to the adverts topic (a node answers with an advert at once).
    AdvertSubscriber {
        /// The peer.
        peer: PeerId,
    },
    /// Listening on a new address.
    Listening(Multiaddr),
    /// Hole punching over a relayed connection to `peer` ended.
    DirectUpgrade {
        /// The peer.
        peer: PeerId,
        /// Whether a direct connection now exists.
        succeeded: bool,
    },
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The transport or behaviour could not be built.
    #[error("could not build the swarm: {0}")]
    Build(String),
    /// An address could not be listened on.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        cause: String,
    },
    /// A bootstrap address lacks its `/p2p/<peer id>` suffix.
    #[error("bootstrap address {0} must end in /p2p/<peer id>")]
    BootstrapWithoutPeerId(Multiaddr),
    /// A dial failed at once.
    #[error("cannot dial {addr}: {cause}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        cause: String,
    },
    /// Gossip refused the message.
    #[error("publish failed: {0}")]
    Publish(String),
    /// The swarm task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

enum Command {
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Disconnect {
        peer: PeerId,
    },
    Path {
        peer: PeerId,
        reply: oneshot::Sender<Option<Path>>,
    },
    Paths {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Path>>,
    },
    CloseSpentCircuits {
        peer: PeerId,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    reachability: watch::Receiver<Reachability>,
    metrics: NetMetrics,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl NetHandle {
    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A control for opening and accepting streams (cheap to clone; one per opener).
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Gossips encoded advert bytes on the adverts topic.
    pub async fn publish_advert(&self, data: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::Publish { data, reply }).await?
    }

    /// Dials `addr` (which may end in `/p2p/<id>`).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Tells the swarm where `peer` can be reached, so streams to it can dial.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        self.commands
            .send(Command::AddAddresses { peer, addrs })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// The addresses the swarm is listening on now.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(|reply| Command::ConnectedPeers { reply }).await
    }

    /// The connection a new stream to `peer` would use: a direct one when there is one,
    /// else a relayed one; `None` when not connected.
    pub async fn path(&self, peer: PeerId) -> Result<Option<Path>, NetError> {
        self.ask(|reply| Command::Path { peer, reply }).await
    }

    /// Every open connection to `peer`.
    pub async fn paths(&self, peer: PeerId) -> Result<Vec<Path>, NetError> {
        self.ask(|reply| Command::Paths { peer, reply }).await
    }

    /// Closes, after a grace for the frames in flight, the relayed connections to `peer`
    /// whose circuit is too close to its limit to carry another job: the next stream then
    /// takes a fresh circuit or a direct connection.
    pub async fn close_spent_circuits(&self, peer: PeerId) -> Result<(), NetError> {
        self.commands
            .send(Command::CloseSpentCircuits { peer })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// How others reach this peer, kept current by the swarm task.
    pub fn reachability(&self) -> watch::Receiver<Reachability> {
        self.reachability.clone()
    }

    /// The swarm's Prometheus figures.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    /// Closes every connection to `peer`.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.commands
            .send(Command::Disconnect { peer })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Stops the swarm task, closing every connection; returns once it has stopped.
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Command::Shutdown { reply }).await;
    }
}

/// Builds the swarm, starts listening and dialing the bootstrap peers, and spawns the task
/// that owns it on the current tokio runtime. Listen addresses are bound before this
/// returns, so `listen_addrs` soon reports the real ports.
pub async fn start(
    key: Keypair,
    config: &NetConfig,
) -> Result<
    (
        NetHandle,
        mpsc::Receiver<NetEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NetError,
> {
    config.validate().map_err(NetError::Build)?;
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let quic_idle = u32::try_from((config.ping_interval * 3).as_millis()).unwrap_or(u32::MAX);
    let mut behaviour_error = None;
    // The relay client's transport, with each circuit counted where the relay counts it.
    let unclaimed = Arc::new(Unclaimed::default());
    let metrics = NetMetrics::default();
    let (relay_transport, relay_client) = relay::client::new(key.public().to_peer_id());
    let mut relay_client = Some(relay_client);
    let (u, t) = (unclaimed.clone(), metrics.relayed_totals());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_quic_config(|mut c| {
            // Notice a silent QUIC peer as fast as a failed ping would.
            c.max_idle_timeout = quic_idle;
            c.keep_alive_interval = config.ping_interval;
            c
        })
        .with_other_transport(move |key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                relay_transport
                    .map(move |conn, endpoint| circuits::count(conn, endpoint, &u, &t))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(|e| build(&e))?
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|key| {
            match Behaviour::new(
                key,
                config,
                relay_client.take().expect("the behaviour is built once"),
            ) {
                Ok(b) => Ok(b),
                Err(e) => {
                    behaviour_error = Some(e.clone());
                    Err(e.into())
                }
            }
        })
        .map_err(|e| NetError::Build(behaviour_error.clone().unwrap_or_else(|| e.to_string())))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        // An AutoNAT server must see a dial-back fail before the client's and its own
        // 10 s request timeouts: behind a NAT that drops unsolicited packets (most), a
        // dial only ends at this timeout, and at libp2p's 10 s the client never hears
        // "unreachable", only a timeout.
        .with_connection_timeout(if config.autonat_server {
            Duration::from_secs(7)
        } else {
            Duration::from_secs(10)
        })
        .build();

    let topic = gossipsub::IdentTopic::new(ADVERTS_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| build(&e))?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                cause: e.to_string(),
            })?;
    }
    for addr in &config.external {
        swarm.add_external_address(addr.clone());
    }
    let mut relay_candidates = HashMap::new();
    for addr in &config.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(NetError::BootstrapWithoutPeerId(addr.clone()));
        };
        relay_candidates.insert(peer, addr.clone());
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
    }

    let control = swarm.behaviour().stream.new_control();
    let (commands, command_rx) = mpsc::channel(COMMAND_BUFFER);
    let (events, event_rx) = mpsc::channel(EVENT_BUFFER);
    let reach = Reachability {
        upnp: if config.upnp {
            UpnpStatus::Searching
        } else {
            UpnpStatus::Off
        },
        ..Reachability::default()
    };
    let (reach_tx, reach_rx) = watch::channel(reach.clone());
    let handle = NetHandle {
        commands,
        control,
        peer_id: *swarm.local_peer_id(),
        reachability: reach_rx,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(
        EventLoop {
            swarm,
            commands: command_rx,
            events,
            topic,
            dropped_events: 0,
            config: config.clone(),
            conns: HashMap::new(),
            pending_limits: HashMap::new(),
            unclaimed,
            reach,
            reach_tx,
            relay_candidates,
            relay_listeners: HashMap::new(),
            bootstrap: config.bootstrap.clone(),
            served_reservations: Default::default(),
            offers_relay: Default::default(),
            redials: HashMap::new(),
            metrics,
        }
        .run(),
    );
    Ok((handle, event_rx, task))
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    topic: gossipsub::IdentTopic,
    dropped_events: u64,
    config: NetConfig,
    /// Open connections (bounded by the connection limit).
    conns: HashMap<ConnectionId, ConnInfo>,
    /// Circuit limits granted by relays, by the remote peer (inbound circuits) or the relay
    /// (outbound), until their connection is up.
    pending_limits: HashMap<PeerId, (Option<Duration>, Option<u64>, Instant)>,
    unclaimed: Arc<Unclaimed>,
    reach: Reachability,
    reach_tx: watch::Sender<Reachability>,
    /// Bootstrap peers, which may offer a relay.
    relay_candidates: HashMap<PeerId, Multiaddr>,
    /// Relay reservations asked for, by relay, and whether the relay accepted.
    relay_listeners: HashMap<PeerId, (ListenerId, bool)>,
    /// Bootstrap peers lost, with when to dial them again and how many tries so far: a
    /// peer behind NAT cannot be dialed back, so it must come back by itself (to its relay
    /// above all). At most one entry per bootstrap peer.
    redials: HashMap<PeerId, (Instant, u32)>,
    /// Bootstrap peers that offer a relay.
    offers_relay: std::collections::HashSet<PeerId>,
    /// Peers holding a reservation on this relay.
    served_reservations: std::collections::HashSet<PeerId>,
    /// Bootstrap peers not dialed yet: they are dialed once a listener is up, so the
    /// connection leaves from the listen port (what a NAT then maps, and what peers see).
    bootstrap: Vec<Multiaddr>,
    metrics: NetMetrics,
}

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => {
                    // No listener came up within a tick: dial from any port.
                    self.dial_bootstrap();
                    self.redial_due();
                    self.retire_spent_circuits();
                }
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.close_all();
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    // Every handle is gone: nobody can use the network any more.
                    None => {
                        self.close_all();
                        return;
                    }
                },
            }
        }
    }

    fn close_all(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn emit(&mut self, event: NetEvent) {
        if self.events.try_send(event).is_err() {
            self.dropped_events += 1;
            if self.dropped_events.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped_events,
                    "network events dropped: the consumer is slow"
                );
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), data)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(format!("{e:?}")));
                let _ = reply.send(result);
            }
            Command::Dial { addr, reply } => {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                let result = self.swarm.dial(addr.clone()).map_err(|e| NetError::Dial {
                    addr,
                    cause: e.to_string(),
                });
                let _ = reply.send(result);
            }
            Command::AddAddresses { peer, addrs } => {
                for addr in addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Path { peer, reply } => {
                let mut paths = self.paths(peer);
                // A new stream takes a direct connection when there is one.
                paths.sort_by_key(Path::is_relayed);
                let _ = reply.send(paths.into_iter().next());
            }
            Command::Paths { peer, reply } => {
                let _ = reply.send(self.paths(peer));
            }
            Command::CloseSpentCircuits { peer } => {
                let now = Instant::now();
                for c in self.conns.values_mut().filter(|c| {
                    c.peer == peer && c.budget.as_ref().is_some_and(|b| b.must_end(now, 0, 0))
                }) {
                    c.retire_at.get_or_insert(now + RETIRE_GRACE);
                }
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // A public server's listeners are its external addresses (unless the
                // operator named others), so it relays and answers AutoNAT at once.
                if self.config.public && self.config.external.is_empty() && !is_relayed(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.refresh_reachability();
                self.dial_bootstrap();
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.refresh_reachability();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.refresh_reachability();
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                tracing::debug!(%address, "external address candidate");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self
                    .relay_listeners
                    .iter()
                    .find(|(_, (id, _))| *id == listener_id)
                    .map(|(p, _)| *p)
                {
                    tracing::info!(%relay, ?reason, "relay reservation ended");
                    self.relay_listeners.remove(&relay);
                    self.count_reservations();
                    // Denied or closed while the relay is still connected: ask again (a
                    // lost relay is asked again once it is dialed back and identified).
                    if self.swarm.is_connected(&relay) {
                        self.maybe_reserve(relay);
                    }
                }
                self.refresh_reachability();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), relayed = endpoint.is_relayed(), "connected");
                let relayed = endpoint.is_relayed();
                let budget = relayed.then(|| self.budget_for(peer_id, &endpoint));
                let info = ConnInfo {
                    peer: peer_id,
                    remote: endpoint.get_remote_address().clone(),
                    relayed,
                    upgraded: false,
                    budget,
                    retire_at: None,
                };
                self.metrics.opened(info.kind());
                self.conns.insert(connection_id, info);
                self.redials.remove(&peer_id);
                if num_established.get() == 1 {
                    self.emit(NetEvent::Connected {
                        peer: peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if let Some(info) = self.conns.remove(&connection_id) {
                    self.metrics.closed(info.kind());
                }
                if num_established == 0 {
                    self.redial_later(peer_id);
                    self.emit(NetEvent::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id.filter(|p| !self.swarm.is_connected(p)) {
                    self.redial_later(peer);
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance = match decode_advert(&message.data, tessera_protocol::now_ms()) {
                    Ok(advert) if Some(advert.node) == message.source => {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address_list(advert.node, &advert.addrs);
                        self.emit(NetEvent::Advert(Box::new(advert)));
                        gossipsub::MessageAcceptance::Accept
                    }
                    Ok(advert) => {
                        tracing::debug!(named = %advert.node, source = ?message.source, "advert relayed under another author");
                        gossipsub::MessageAcceptance::Reject
                    }
                    // Late or early adverts may be honest clock trouble: drop without blame.
                    Err(e @ (AdvertError::Expired { .. } | AdvertError::FromTheFuture { .. })) => {
                        tracing::debug!(from = %propagation_source, error = %e, "advert ignored");
                        gossipsub::MessageAcceptance::Ignore
                    }
                    Err(e) => {
                        tracing::debug!(from = %propagation_source, error = %e, "advert rejected");
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic, .. })
                if topic == self.topic.hash() =>
            {
                self.emit(NetEvent::AdvertSubscriber { peer: peer_id });
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if !is_relayed(&info.observed_addr)
                    && !self.reach.observed.contains(&info.observed_addr)
                    && self.reach.observed.len() < MAX_NOTED_ADDRS
                {
                    self.reach.observed.push(info.observed_addr.clone());
                    self.publish_reachability();
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME)
                    && self.relay_candidates.contains_key(&peer_id)
                {
                    // Bounded by the bootstrap list.
                    self.offers_relay.insert(peer_id);
                    self.maybe_reserve(peer_id);
                }
                // A peer's private listen addresses are only dialable from its own LAN;
                // elsewhere the same IP may be another host. Its adverts carry what is
                // reachable from outside.
                let lan = self.config.lan_mode();
                for addr in info.listen_addrs.iter().filter(|a| lan || !is_private(a)) {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                self.emit(NetEvent::Identified {
                    peer: peer_id,
                    agent: info.agent_version,
                    listen_addrs: info.listen_addrs,
                });
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            }) => match result {
                Ok(rtt) => self.emit(NetEvent::Rtt { peer, rtt }),
                Err(e) => {
                    // A peer that stops answering pings is gone: close the connection so
                    // every stream on it fails now instead of hanging.
                    tracing::info!(%peer, error = %e, "ping failed; closing connection");
                    self.swarm.close_connection(connection);
                }
            },
            BehaviourEvent::RelayClient(event) => self.on_relay_client(event),
            BehaviourEvent::Relay(event) => self.on_relay_server(event),
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                let succeeded = match result {
                    Ok(connection) => {
                        tracing::info!(peer = %remote_peer_id, "hole punched: direct connection up");
                        // DCUtR reports after the swarm did: the connection is known.
                        if let Some(info) = self.conns.get_mut(&connection) {
                            self.metrics.closed(info.kind());
                            info.upgraded = true;
                            self.metrics.opened(info.kind());
                        }
                        self.reach.upgrades.succeeded += 1;
                        NetMetrics::outcome(&self.metrics.dcutr, "success");
                        true
                    }
                    Err(e) => {
                        tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying on the relay");
                        self.reach.upgrades.failed += 1;
                        NetMetrics::outcome(&self.metrics.dcutr, "failure");
                        false
                    }
                };
                self.publish_reachability();
                self.emit(NetEvent::DirectUpgrade {
                    peer: remote_peer_id,
                    succeeded,
                });
            }
            BehaviourEvent::Autonat(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => match result {
                Ok(()) => tracing::info!(addr = %tested_addr, %server, "AutoNAT: reachable"),
                Err(e) => {
                    tracing::info!(addr = %tested_addr, %server, error = %e, "AutoNAT: not reachable from outside");
                    if !self.reach.unreachable.contains(&tested_addr)
                        && self.reach.unreachable.len() < MAX_NOTED_ADDRS
                    {
                        self.reach.unreachable.push(tested_addr);
                        self.publish_reachability();
                    }
                }
            },
            BehaviourEvent::AutonatServer(autonat::v2::server::Event {
                tested_addr,
                client,
                result,
                ..
            }) => {
                tracing::debug!(addr = %tested_addr, %client, ok = result.is_ok(), "AutoNAT dial-back");
            }
            BehaviourEvent::Upnp(event) => {
                let status = match event {
                    upnp::Event::NewExternalAddr { external_addr, .. } => {
                        tracing::info!(addr = %external_addr, "UPnP: port mapped on the router");
                        UpnpStatus::Mapped
                    }
                    upnp::Event::ExpiredExternalAddr { .. } => UpnpStatus::Searching,
                    upnp::Event::GatewayNotFound => {
                        tracing::info!("UPnP: no gateway answered");
                        UpnpStatus::NoGateway
                    }
                    upnp::Event::NonRoutableGateway => {
                        tracing::info!("UPnP: the gateway is itself behind NAT");
                        UpnpStatus::NonRoutable
                    }
                };
                self.reach.upnp = status;
                self.publish_reachability();
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            _ => {}
        }
    }
}

impl EventLoop {
    /// Schedules the next dial of `peer` if it is a bootstrap peer, backing off.
    fn redial_later(&mut self, peer: PeerId) {
        if !self.relay_candidates.contains_key(&peer) {
            return;
        }
        let tries = self.redials.get(&peer).map_or(0, |(_, n)| *n);
        let at = Instant::now() + redial_backoff(tries);
        self.redials.insert(peer, (at, tries + 1));
    }

    /// Dials the bootstrap peers whose time has come.
    fn redial_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .redials
            .iter()
            .filter(|(p, (at, _))| *at <= now && !self.swarm.is_connected(p))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(addr) = self.relay_candidates.get(&peer).cloned() {
                tracing::info!(%addr, "dialing a lost bootstrap peer again");
                if let Err(e) = self.swarm.dial(addr) {
                    tracing::debug!(%peer, error = %e, "redial refused");
                }
                // The next try is scheduled by its failure (or cleared by its success).
                if let Some(entry) = self.redials.get_mut(&peer) {
                    entry.0 = now + redial_backoff(entry.1);
                }
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        for addr in std::mem::take(&mut self.bootstrap) {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
    }

    fn paths(&self, peer: PeerId) -> Vec<Path> {
        self.conns
            .values()
            .filter(|c| c.peer == peer)
            .map(|c| {
                if c.relayed {
                    Path::Relayed {
                        remote: c.remote.clone(),
                        budget: c.budget.clone(),
                    }
                } else {
                    Path::Direct {
                        remote: c.remote.clone(),
                        upgraded: c.upgraded,
                    }
                }
            })
            .collect()
    }

    /// The budget of a relayed connection to `peer` at `remote`: its byte counter and the
    /// limit its relay granted (heard of by the remote peer for an inbound circuit, by
    /// the relay for an outbound one).
    fn budget_for(&mut self, peer: PeerId, endpoint: &ConnectedPoint) -> CircuitBudget {
        // An accepted circuit's limit was heard of under its source, a dialed one's under
        // its relay (the peer before `/p2p-circuit`).
        let key = match endpoint {
            ConnectedPoint::Listener { .. } => Some(peer),
            ConnectedPoint::Dialer { address, .. } => crate::reachability::relay_part(address)
                .iter()
                .fold(None, |last, p| match p {
                    Protocol::P2p(id) => Some(id),
                    _ => last,
                }),
        };
        let now = Instant::now();
        let limit = key
            .and_then(|k| self.pending_limits.remove(&k))
            // A limit heard of long ago belongs to a circuit that never became a connection.
            .filter(|(_, _, at)| now.duration_since(*at) < PENDING_LIMIT_TTL);
        let (duration, bytes, opened) = limit.unwrap_or((None, None, now));
        CircuitBudget::new(opened, duration, bytes, self.unclaimed.claim(&peer))
    }

    fn note_limit(&mut self, peer: PeerId, (duration, bytes): (Option<Duration>, Option<u64>)) {
        // A circuit whose connection is already up takes the limit now.
        if let Some(info) = self
            .conns
            .values_mut()
            .filter(|c| c.relayed && c.peer == peer)
            .find(|c| {
                c.budget
                    .as_ref()
                    .is_none_or(|b| b.duration.is_none() && b.bytes_limit.is_none())
            })
        {
            info.budget = Some(match info.budget.take() {
                Some(old) => old.with_limits(duration, bytes),
                None => CircuitBudget::new(Instant::now(), duration, bytes, None),
            });
            return;
        }
        if self.pending_limits.len() >= MAX_PENDING_LIMITS {
            if let Some(oldest) = self
                .pending_limits
                .iter()
                .min_by_key(|(_, (_, _, at))| *at)
                .map(|(p, _)| *p)
            {
                self.pending_limits.remove(&oldest);
            }
        }
        self.pending_limits
            .insert(peer, (duration, bytes, Instant::now()));
    }

    fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                limit,
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, ?limit, "relay reservation accepted");
                }
                if let Some((_, accepted)) = self.relay_listeners.get_mut(&relay_peer_id) {
                    *accepted = true;
                }
                self.count_reservations();
            }
            relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            } => {
                tracing::debug!(relay = %relay_peer_id, ?limit, "outbound circuit");
                let limit = limit.map_or((None, None), |l| (l.duration(), l.data_in_bytes()));
                self.note_limit(relay_peer_id, limit);
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                tracing::debug!(peer = %src_peer_id, ?limit, "inbound circuit");
                let limit = limit.map_or((None, None), |l| (l.duration(), l.data_in_bytes()));
                self.note_limit(src_peer_id, limit);
            }
        }
    }

    #[allow(deprecated)] // matching every variant, the deprecated ones included
    fn on_relay_server(&mut self, event: relay::Event) {
        tracing::debug!(?event, "relay");
        let m = &self.metrics;
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if !renewed {
                    tracing::info!(peer = %src_peer_id, "relaying for a peer behind NAT");
                }
                // Bounded by the relay's max_reservations.
                self.served_reservations.insert(src_peer_id);
                m.relay_reservations
                    .set(self.served_reservations.len() as i64);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.served_reservations.remove(&src_peer_id);
                m.relay_reservations
                    .set(self.served_reservations.len() as i64);
            }
            relay::Event::CircuitReqAccepted { .. } => {
                NetMetrics::outcome(&m.relay_circuits, "accepted")
            }
            relay::Event::CircuitReqDenied { .. } => {
                NetMetrics::outcome(&m.relay_circuits, "denied")
            }
            relay::Event::CircuitClosed { .. } => NetMetrics::outcome(&m.relay_circuits, "closed"),
            _ => {}
        }
    }

    /// Holds a reservation on `relay` (a bootstrap peer offering the relay protocol) while
    /// no direct address of ours is confirmed reachable.
    fn maybe_reserve(&mut self, relay: PeerId) {
        if !self.config.use_relays
            || !self.reach.public.is_empty()
            || self.relay_listeners.contains_key(&relay)
            || self.relay_listeners.len() >= MAX_RELAYS
        {
            return;
        }
        let Some(addr) = self
            .relay_candidates
            .get(&relay)
            .filter(|a| !is_relayed(a))
            .cloned()
        else {
            return;
        };
        let circuit = addr.with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                tracing::info!(%circuit, "asking the relay for a reservation");
                self.relay_listeners.insert(relay, (id, false));
            }
            Err(e) => tracing::warn!(%circuit, error = %e, "cannot listen through the relay"),
        }
    }

    /// Recomputes the confirmed addresses; a peer that turned out public gives its relay
    /// reservations back.
    fn refresh_reachability(&mut self) {
        let lan = self.config.lan_mode();
        let (relayed, public): (Vec<Multiaddr>, Vec<Multiaddr>) = self
            .swarm
            .external_addresses()
            .filter(|a| lan || !is_private(a))
            .cloned()
            .partition(is_relayed);
        self.reach.public = public;
        self.reach.relayed = relayed;
        if !self.reach.public.is_empty() && !self.relay_listeners.is_empty() && !self.config.public
        {
            tracing::info!("publicly reachable: giving relay reservations back");
            for (_, (id, _)) in self.relay_listeners.drain() {
                self.swarm.remove_listener(id);
            }
            self.count_reservations();
        }
        if self.reach.public.is_empty() && self.relay_listeners.is_empty() {
            // Not (or no longer) reachable directly: take a slot on every connected relay.
            let relays: Vec<PeerId> = self
                .offers_relay
                .iter()
                .copied()
                .filter(|r| self.swarm.is_connected(r))
                .collect();
            for relay in relays {
                self.maybe_reserve(relay);
            }
        }
        self.publish_reachability();
    }

    fn publish_reachability(&mut self) {
        let reach = self.reach.clone();
        self.reach_tx.send_if_modified(|old| {
            if *old == reach {
                false
            } else {
                *old = reach;
                true
            }
        });
    }

    /// Closes the spent circuits whose grace is over.
    fn retire_spent_circuits(&mut self) {
        let now = Instant::now();
        let due: Vec<(ConnectionId, PeerId)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.retire_at.is_some_and(|at| at <= now))
            .map(|(id, c)| (*id, c.peer))
            .collect();
        for (id, peer) in due {
            tracing::info!(%peer, "closing a spent relay circuit");
            self.swarm.close_connection(id);
        }
    }

    /// Sets the gauge of reservations relays accepted.
    fn count_reservations(&self) {
        let held = self.relay_listeners.values().filter(|(_, ok)| *ok).count();
        self.metrics.reservations.set(held as i64);
    }
}

/// Wait before the next dial of a lost bootstrap peer: 1 s, doubling, at most a minute.
fn redial_backoff(tries: u32) -> Duration {
    Duration::from_secs(1u64 << tries.min(6)).min(Duration::from_secs(60))
}

trait AddAddressList {
    fn add_address_list(&mut self, peer: PeerId, addrs: &[String]);
}

impl AddAddressList for libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore> {
    fn add_address_list(&mut self, peer: PeerId, addrs: &[String]) {
        for addr in addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
            self.add_address(&peer, addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redial_backoff;
    use std::time::Duration;

    #[test]
    fn lost_bootstrap_peers_are_dialed_again_backing_off_to_a_minute() {
        let waits: Vec<u64> = (0..9).map(|n| redial_backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(redial_backoff(u32::MAX), Duration::from_secs(60));
    }
}
