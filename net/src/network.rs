//! The task that owns the swarm, the handle that talks to it, and the events it reports.

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::NetConfig;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{
    gossipsub, identify, identity::Keypair, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm,
};
use std::time::Duration;
use tessera_protocol::{decode_advert, AdvertError, NodeAdvert, ADVERTS_TOPIC};
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for the swarm task.
const COMMAND_BUFFER: usize = 64;
/// Events waiting for the owner; beyond this the oldest news is dropped, not the swarm.
const EVENT_BUFFER: usize = 256;

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
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|key| match Behaviour::new(key, config) {
            Ok(b) => Ok(b),
            Err(e) => {
                behaviour_error = Some(e.clone());
                Err(e.into())
            }
        })
        .map_err(|e| NetError::Build(behaviour_error.clone().unwrap_or_else(|| e.to_string())))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
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
    for addr in &config.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(NetError::BootstrapWithoutPeerId(addr.clone()));
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }

    let control = swarm.behaviour().stream.new_control();
    let (commands, command_rx) = mpsc::channel(COMMAND_BUFFER);
    let (events, event_rx) = mpsc::channel(EVENT_BUFFER);
    let handle = NetHandle {
        commands,
        control,
        peer_id: *swarm.local_peer_id(),
    };
    let task = tokio::spawn(
        EventLoop {
            swarm,
            commands: command_rx,
            events,
            topic,
            dropped_events: 0,
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
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
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
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if num_established.get() == 1 {
                    self.emit(NetEvent::Connected {
                        peer: peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.emit(NetEvent::Disconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
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
                for addr in &info.listen_addrs {
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
