//! Job streams prefer a direct connection. libp2p-stream opens a new stream on any
//! connection to the peer, chosen at random; once hole punching has added a direct
//! connection beside a relayed one, that would leave half the jobs on the relay. This
//! wrapper shows libp2p-stream a peer's relayed connections only while the peer has no
//! direct one. Streams already open on a relayed connection keep running, and inbound
//! streams are accepted on every connection.

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    behaviour::{ConnectionClosed, ConnectionEstablished},
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{core::ConnectedPoint, Multiaddr, PeerId};
use std::collections::HashMap;
use std::task::{Context, Poll};

struct Conn {
    id: ConnectionId,
    endpoint: ConnectedPoint,
    relayed: bool,
    /// Whether libp2p-stream knows it (may open new streams on it).
    shown: bool,
}

/// libp2p-stream's behaviour, steered to direct connections.
pub(crate) struct PreferDirect {
    inner: libp2p_stream::Behaviour,
    /// Open connections per peer (bounded by the swarm's connection limit).
    conns: HashMap<PeerId, Vec<Conn>>,
}

impl PreferDirect {
    pub(crate) fn new() -> Self {
        Self {
            inner: libp2p_stream::Behaviour::new(),
            conns: HashMap::new(),
        }
    }

    /// A control for opening and accepting streams.
    pub(crate) fn new_control(&self) -> libp2p_stream::Control {
        self.inner.new_control()
    }

    fn show(inner: &mut libp2p_stream::Behaviour, peer: PeerId, c: &mut Conn) {
        if !c.shown {
            c.shown = true;
            inner.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: c.id,
                endpoint: &c.endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
        }
    }

    fn hide(inner: &mut libp2p_stream::Behaviour, peer: PeerId, c: &mut Conn) {
        if c.shown {
            c.shown = false;
            inner.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id: peer,
                connection_id: c.id,
                endpoint: &c.endpoint,
                cause: None,
                remaining_established: 0,
            }));
        }
    }

    fn established(&mut self, e: &ConnectionEstablished) {
        let relayed = e.endpoint.is_relayed();
        let conns = self.conns.entry(e.peer_id).or_default();
        let has_direct = conns.iter().any(|c| !c.relayed);
        let mut conn = Conn {
            id: e.connection_id,
            endpoint: e.endpoint.clone(),
            relayed,
            shown: false,
        };
        if !relayed || !has_direct {
            Self::show(&mut self.inner, e.peer_id, &mut conn);
        }
        if !relayed {
            for c in conns.iter_mut().filter(|c| c.relayed) {
                Self::hide(&mut self.inner, e.peer_id, c);
            }
        }
        conns.push(conn);
    }

    fn closed(&mut self, e: &ConnectionClosed) {
        let Some(conns) = self.conns.get_mut(&e.peer_id) else {
            return;
        };
        if let Some(i) = conns.iter().position(|c| c.id == e.connection_id) {
            let mut gone = conns.swap_remove(i);
            Self::hide(&mut self.inner, e.peer_id, &mut gone);
        }
        if !conns.iter().any(|c| !c.relayed) {
            for c in conns.iter_mut() {
                Self::show(&mut self.inner, e.peer_id, c);
            }
        }
        if conns.is_empty() {
            self.conns.remove(&e.peer_id);
        }
    }
}

impl NetworkBehaviour for PreferDirect {
    type ConnectionHandler = <libp2p_stream::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = <libp2p_stream::Behaviour as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => self.established(&e),
            FromSwarm::ConnectionClosed(e) => self.closed(&e),
            other => self.inner.on_swarm_event(other),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn established(b: &mut PreferDirect, peer: PeerId, id: usize, endpoint: &ConnectedPoint) {
        b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
    }

    fn closed(b: &mut PreferDirect, peer: PeerId, id: usize, endpoint: &ConnectedPoint) {
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            cause: None,
            remaining_established: 0,
        }));
    }

    fn shown(b: &PreferDirect, peer: &PeerId) -> Vec<(bool, bool)> {
        b.conns
            .get(peer)
            .map(|v| v.iter().map(|c| (c.relayed, c.shown)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn new_streams_see_relayed_connections_only_while_no_direct_one_is_up() {
        let mut b = PreferDirect::new();
        let peer = PeerId::random();
        let relayed = ConnectedPoint::Listener {
            local_addr: "/ip4/203.0.113.1/tcp/7300/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust/p2p-circuit"
                .parse()
                .expect("addr"),
            send_back_addr: Multiaddr::empty().with(libp2p::multiaddr::Protocol::P2p(peer)),
        };
        let direct = ConnectedPoint::Dialer {
            address: "/ip4/203.0.113.11/tcp/7400".parse().expect("addr"),
            role_override: Endpoint::Listener,
            port_use: PortUse::Reuse,
        };
        assert!(relayed.is_relayed() && !direct.is_relayed());
        established(&mut b, peer, 1, &relayed);
        assert_eq!(
            shown(&b, &peer),
            [(true, true)],
            "alone, the relay carries streams"
        );
        established(&mut b, peer, 2, &direct);
        assert_eq!(
            shown(&b, &peer),
            [(true, false), (false, true)],
            "a punched connection takes the new streams"
        );
        established(&mut b, peer, 3, &relayed);
        assert_eq!(
            shown(&b, &peer)[2],
            (true, false),
            "a later circuit stays hidden"
        );
        closed(&mut b, peer, 2, &direct);
        assert_eq!(
            shown(&b, &peer),
            [(true, true), (true, true)],
            "without a direct connection the relayed ones carry streams again"
        );
        closed(&mut b, peer, 1, &relayed);
        closed(&mut b, peer, 3, &relayed);
        assert!(b.conns.is_empty(), "nothing kept for a peer that is gone");
    }
}
