//! Two real swarms on loopback: only adverts that are well formed, signed by the node
//! they name, and published by that same node reach the owner of the swarm.

use std::time::Duration;
use tessera_net::{start, NetConfig, NetEvent, Protocol};
use tessera_protocol::{
    encode_advert, Address, AdvertStatus, Keypair, Load, NodeAdvert, PROTOCOL_VERSION,
};
use tokio::sync::mpsc::Receiver;

fn advert(node: &Keypair, seq: u64) -> NodeAdvert {
    NodeAdvert {
        version: PROTOCOL_VERSION,
        node: node.public().to_peer_id(),
        seq,
        timestamp_ms: tessera_protocol::now_ms(),
        ttl_secs: 30,
        status: AdvertStatus::Online,
        payout: Address::default(),
        addrs: vec![],
        modules: vec![],
        capacity: 1,
        load: Load::default(),
        tokens_generated: seq,
    }
}

async fn next_matching<T>(
    events: &mut Receiver<NetEvent>,
    mut f: impl FnMut(NetEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(t) = f(events.recv().await.expect("swarm running")) {
                return t;
            }
        }
    })
    .await
    .expect("event within 20 s")
}

#[tokio::test]
async fn forged_misattributed_and_garbage_adverts_are_dropped_valid_ones_delivered() {
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        ..NetConfig::default()
    };
    let (key_a, key_b, other) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    let (a, mut a_events, _a_task) = start(key_a.clone(), &config).await.expect("swarm a");
    let (b, mut b_events, _b_task) = start(key_b, &config).await.expect("swarm b");
    let addr = next_matching(&mut a_events, |e| match e {
        NetEvent::Listening(addr) => Some(addr),
        _ => None,
    })
    .await;
    b.dial(addr.with(Protocol::P2p(a.peer_id())))
        .await
        .expect("dial");
    let b_id = b.peer_id();
    next_matching(&mut a_events, |e| {
        matches!(e, NetEvent::AdvertSubscriber { peer } if peer == b_id).then_some(())
    })
    .await;

    // Names A but is signed by another key.
    a.publish_advert(encode_advert(advert(&key_a, 1), &other).expect("encode"))
        .await
        .expect("publish");
    // Correctly signed by `other`, but relayed as if A wrote it.
    a.publish_advert(encode_advert(advert(&other, 2), &other).expect("encode"))
        .await
        .expect("publish");
    // Not an advert at all.
    a.publish_advert(b"garbage".to_vec())
        .await
        .expect("publish");
    // Expired an hour ago.
    let mut old = advert(&key_a, 3);
    old.timestamp_ms -= 3_600_000;
    a.publish_advert(encode_advert(old, &key_a).expect("encode"))
        .await
        .expect("publish");
    // The real thing.
    a.publish_advert(encode_advert(advert(&key_a, 4), &key_a).expect("encode"))
        .await
        .expect("publish");

    let got = next_matching(&mut b_events, |e| match e {
        NetEvent::Advert(advert) => Some(advert),
        _ => None,
    })
    .await;
    assert_eq!(got.seq, 4, "the first advert delivered is the valid one");
    assert_eq!(got.node, a.peer_id());

    a.shutdown().await;
    b.shutdown().await;
}
