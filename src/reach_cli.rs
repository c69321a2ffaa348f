//! `tessera node --check`: join the network with the node's identity and settings, run
//! the reachability checks (bootstrap, observed address, AutoNAT, UPnP, relay), and tell
//! the owner what to change. Loads no model.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tessera_net::{NetEvent, PeerId, Protocol, Reachability, UpnpStatus};
use tessera_node::NodeConfig;

/// Runs the checks for at most `wait` and prints the verdict; an error when the node would
/// not be reachable at all.
pub async fn check(config: NodeConfig, wait: Duration) -> Result<()> {
    let (key, _) = tessera_net::load_or_create_identity(&config.data_dir.join("identity.key"))
        .context("cannot load the node's identity")?;
    let id = key.public().to_peer_id();
    let (net, mut events, task) = tessera_net::start(key, &config.net)
        .await
        .with_context(|| {
            "cannot start the network: is the node running? Stop it first, or pass --listen with another port"
        })?;
    eprintln!(
        "checking how peers reach node {id} (up to {} s)",
        wait.as_secs()
    );
    let bootstrap: Vec<PeerId> = config
        .net
        .bootstrap
        .iter()
        .filter_map(|a| match a.iter().last() {
            Some(Protocol::P2p(p)) => Some(p),
            _ => None,
        })
        .collect();
    if bootstrap.is_empty() {
        eprintln!("  no --bootstrap peer: nobody can tell this node how it is seen; add a coordinator's address");
    }
    let mut reach = net.reachability();
    let deadline = tokio::time::Instant::now() + wait;
    let mut connected: Vec<PeerId> = Vec::new();
    loop {
        let done = {
            let r = reach.borrow_and_update();
            settled(&r, config.net.upnp)
        };
        if done {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            changed = reach.changed() => if changed.is_err() { break },
            event = events.recv() => match event {
                Some(NetEvent::Connected { peer, addr }) if bootstrap.contains(&peer) => {
                    eprintln!("  bootstrap {peer}: connected at {addr}");
                    connected.push(peer);
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    for peer in bootstrap.iter().filter(|p| !connected.contains(p)) {
        eprintln!("  bootstrap {peer}: NOT connected (check the address and that it is running)");
    }
    let r = reach.borrow().clone();
    for addr in &r.observed {
        eprintln!("  peers see this node come from {addr}");
    }
    for addr in &r.public {
        eprintln!("  reachable from outside at {addr}");
    }
    for addr in &r.unreachable {
        eprintln!("  AutoNAT: {addr} is not reachable from outside (a dial back failed)");
    }
    eprintln!(
        "  UPnP: {}",
        match r.upnp {
            UpnpStatus::Off => "off (--no-upnp)",
            UpnpStatus::Searching => "no answer yet",
            UpnpStatus::NoGateway => "no gateway answered on the LAN",
            UpnpStatus::NonRoutable => "the gateway is itself behind NAT",
            UpnpStatus::Mapped => "port mapped on the router",
        }
    );
    for addr in &r.relayed {
        eprintln!("  relay reservation: {addr}");
    }
    eprintln!("result: {}", r.summary());
    let ports: Vec<u16> = config
        .net
        .listen
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Tcp(p) | Protocol::Udp(p) => Some(p),
                _ => None,
            })
        })
        .fold(Vec::new(), |mut v, p| {
            if !v.contains(&p) {
                v.push(p);
            }
            v
        });
    let advice = r.advice(&ports);
    if advice.is_empty() {
        eprintln!("what to do: nothing");
    } else {
        eprintln!("what to do:");
        for line in advice {
            eprintln!("  - {line}");
        }
    }
    net.shutdown().await;
    let _ = task.await;
    if !r.known() {
        bail!("node {id} is not reachable from outside: see what to do above");
    }
    Ok(())
}

/// Whether the checks have answered: a confirmed public address, or a relay reservation
/// after AutoNAT found the address unreachable and UPnP has answered.
fn settled(r: &Reachability, upnp: bool) -> bool {
    if !r.public.is_empty() {
        return true;
    }
    let upnp_answered = !upnp || r.upnp != UpnpStatus::Searching;
    !r.relayed.is_empty() && !r.unreachable.is_empty() && upnp_answered
}
