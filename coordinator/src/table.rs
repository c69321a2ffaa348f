//! The live table of nodes, built from adverts, identify and ping: what each node serves,
//! at what price, how loaded and how fast it is, and when it was last heard from. Entries
//! expire when a node goes silent past its advert's TTL, and go at once when it says it
//! is leaving.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tessera_net::{NetEvent, PeerId};
use tessera_protocol::{AdvertStatus, ModuleId, NodeAdvert, Price};

/// Tokens per second the coordinator itself measured on a node's jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// Jobs measured.
    pub jobs: u64,
    /// Exponentially weighted tokens per second after the first token.
    pub tokens_per_sec: f64,
    /// Exponentially weighted time to first token, as the node measured it (ms).
    pub ttft_ms: f64,
}

impl Throughput {
    fn record(&mut self, tokens: u32, elapsed: Duration, ttft_ms: u32) {
        if tokens < 2 || elapsed.is_zero() {
            return;
        }
        let tps = f64::from(tokens - 1) / elapsed.as_secs_f64();
        let ttft = f64::from(ttft_ms);
        (self.tokens_per_sec, self.ttft_ms) = if self.jobs == 0 {
            (tps, ttft)
        } else {
            (
                0.8 * self.tokens_per_sec + 0.2 * tps,
                0.8 * self.ttft_ms + 0.2 * ttft,
            )
        };
        self.jobs += 1;
    }
}

/// What the coordinator knows of one node.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    /// The latest valid advert.
    pub advert: NodeAdvert,
    /// When the latest advert arrived.
    pub last_seen: Instant,
    /// When the entry lapses without a newer advert (local clock).
    pub expires: Instant,
    /// Latest ping round trip, if connected.
    pub rtt: Option<Duration>,
    /// The node's agent string, once identified.
    pub agent: Option<String>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// When this coordinator first saw its advert in the current stay (uptime).
    pub joined: Instant,
    /// Speed measured on this coordinator's own jobs.
    pub observed: Throughput,
    /// Jobs that failed on this node (transport or node error) since it joined.
    pub failures: u64,
    /// When the latest failure happened.
    pub last_failure: Option<Instant>,
    /// Jobs this coordinator has running on it now (adverts lag behind dispatch).
    pub inflight: u32,
}

/// Every node currently advertising.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: HashMap<PeerId, NodeEntry>,
    /// RTTs and agents of peers whose advert has not arrived yet.
    pending: HashMap<PeerId, (Option<Duration>, Option<String>)>,
    /// Nodes that said goodbye: the seq of their leaving advert, so an older advert still
    /// in flight cannot bring them back.
    left: HashMap<PeerId, (u64, Instant)>,
    /// Audit standings, kept across a node's comings and goings (the auditor writes them).
    standings: HashMap<PeerId, crate::audit::NodeRecord>,
}

/// How long a goodbye is remembered.
const LEFT_MEMORY: Duration = Duration::from_secs(600);
/// Most nodes (and remembered goodbyes) the table holds: every entry needs a signed advert,
/// but keys cost nothing, so the table must not grow with an attacker's key count.
pub const MAX_NODES: usize = 10_000;

impl NodeTable {
    /// Applies one network event at `now`.
    pub fn apply(&mut self, event: &NetEvent, now: Instant) {
        match event {
            NetEvent::Advert(advert) => self.on_advert(advert, now),
            NetEvent::Rtt { peer, rtt } => match self.nodes.get_mut(peer) {
                Some(e) => {
                    e.rtt = Some(*rtt);
                    e.connected = true;
                }
                None => self.pending_entry(*peer).0 = Some(*rtt),
            },
            NetEvent::Identified { peer, agent, .. } => match self.nodes.get_mut(peer) {
                Some(e) => e.agent = Some(agent.clone()),
                None => self.pending_entry(*peer).1 = Some(agent.clone()),
            },
            NetEvent::Connected { peer, .. } => {
                if let Some(e) = self.nodes.get_mut(peer) {
                    e.connected = true;
                }
            }
            NetEvent::Disconnected { peer } => {
                self.pending.remove(peer);
                if let Some(e) = self.nodes.get_mut(peer) {
                    e.connected = false;
                    e.rtt = None;
                }
            }
            NetEvent::AdvertSubscriber { .. }
            | NetEvent::Listening(_)
            | NetEvent::DirectUpgrade { .. } => {}
        }
    }

    fn pending_entry(&mut self, peer: PeerId) -> &mut (Option<Duration>, Option<String>) {
        // Only connected peers produce these and disconnects remove them; the cap covers a
        // disconnect event lost to a full event queue.
        if self.pending.len() >= MAX_NODES && !self.pending.contains_key(&peer) {
            self.pending.clear();
        }
        self.pending.entry(peer).or_default()
    }

    fn on_advert(&mut self, advert: &NodeAdvert, now: Instant) {
        if advert.status == AdvertStatus::Leaving {
            if self.left.len() < MAX_NODES {
                self.left.insert(advert.node, (advert.seq, now));
            }
            if self.nodes.remove(&advert.node).is_some() {
                tracing::info!(node = %advert.node, "node left the network");
            }
            return;
        }
        if let Some((seq, _)) = self.left.get(&advert.node) {
            if advert.seq <= *seq {
                return;
            }
            self.left.remove(&advert.node);
        }
        let expires = now + Duration::from_secs(u64::from(advert.ttl_secs));
        let full = self.nodes.len() >= MAX_NODES;
        match self.nodes.get_mut(&advert.node) {
            Some(e) if advert.seq <= e.advert.seq => {}
            Some(e) => {
                e.advert = advert.clone();
                e.last_seen = now;
                e.expires = expires;
            }
            None if full => {
                tracing::warn!(node = %advert.node, "node table full; advert ignored");
            }
            None => {
                let (rtt, agent) = self.pending.remove(&advert.node).unwrap_or_default();
                tracing::info!(node = %advert.node, modules = advert.modules.len(), "node joined");
                self.nodes.insert(
                    advert.node,
                    NodeEntry {
                        advert: advert.clone(),
                        last_seen: now,
                        expires,
                        rtt,
                        agent,
                        connected: rtt.is_some(),
                        joined: now,
                        observed: Throughput::default(),
                        failures: 0,
                        last_failure: None,
                        inflight: 0,
                    },
                );
            }
        }
    }

    /// Drops entries whose adverts lapsed by `now`; returns the nodes dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        self.left
            .retain(|_, (_, at)| now.duration_since(*at) < LEFT_MEMORY);
        let gone: Vec<PeerId> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            tracing::info!(node = %p, "node expired: no advert within its TTL");
            self.nodes.remove(p);
        }
        gone
    }

    /// One node's entry.
    pub fn get(&self, peer: &PeerId) -> Option<&NodeEntry> {
        self.nodes.get(peer)
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.values()
    }

    /// Nodes offering `module`.
    pub fn serving<'a>(&'a self, module: &'a ModuleId) -> impl Iterator<Item = &'a NodeEntry> + 'a {
        self.nodes
            .values()
            .filter(move |e| e.advert.modules.iter().any(|m| &m.module == module))
    }

    /// A node to run `module` on at no more than `max_price`: one with a free slot, the
    /// least loaded first, then the cheapest output price, then the nearest. (The API's
    /// router weighs more; this is the network layer's sensible default.)
    pub fn pick(&self, module: &ModuleId, max_price: &Price) -> Option<PeerId> {
        self.nodes
            .values()
            .filter_map(|e| {
                let offer = e.advert.modules.iter().find(|m| &m.module == module)?;
                let held = e.advert.load.running.saturating_add(e.advert.load.waiting);
                (offer.price.within(max_price) && held < e.advert.capacity).then(|| {
                    let load = f64::from(held) / f64::from(e.advert.capacity.max(1));
                    (
                        load,
                        offer.price.per_1k_output,
                        e.rtt.unwrap_or(Duration::MAX),
                        e.advert.node,
                    )
                })
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|(.., peer)| peer)
    }

    /// How many nodes are in the table.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Records `node`'s audit standing (routing leaves out nodes under dispute).
    pub fn set_standing(&mut self, node: PeerId, record: crate::audit::NodeRecord) {
        self.standings.insert(node, record);
    }

    /// `node`'s audit standing, if it has one.
    pub fn standing(&self, node: &PeerId) -> Option<&crate::audit::NodeRecord> {
        self.standings.get(node)
    }

    /// Every standing known.
    pub fn standings(&self) -> impl Iterator<Item = (&PeerId, &crate::audit::NodeRecord)> {
        self.standings.iter()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records a finished job's speed as seen from here.
    pub fn record_job(
        &mut self,
        peer: &PeerId,
        tokens: u32,
        after_first_token: Duration,
        ttft_ms: u32,
    ) {
        if let Some(e) = self.nodes.get_mut(peer) {
            e.observed.record(tokens, after_first_token, ttft_ms);
        }
    }

    /// Counts a job dispatched to `peer` until [`NodeTable::end_job`].
    pub fn begin_job(&mut self, peer: &PeerId) {
        if let Some(e) = self.nodes.get_mut(peer) {
            e.inflight = e.inflight.saturating_add(1);
        }
    }

    /// The job begun on `peer` ended, however.
    pub fn end_job(&mut self, peer: &PeerId) {
        if let Some(e) = self.nodes.get_mut(peer) {
            e.inflight = e.inflight.saturating_sub(1);
        }
    }

    /// Records a job that failed on `peer`.
    pub fn record_failure(&mut self, peer: &PeerId) {
        if let Some(e) = self.nodes.get_mut(peer) {
            e.failures += 1;
            e.last_failure = Some(Instant::now());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tessera_protocol::{Address, Load, PROTOCOL_VERSION};

    /// A test module of the llama family with `quant` (a GGUF file type), for tests here,
    /// in routing and in the API.
    pub(crate) fn module(quant: u32) -> ModuleId {
        ModuleId::new(
            "llama",
            tessera_protocol::Quantization::from_gguf_file_type(quant),
            8192,
            tessera_protocol::WeightsHash([1; 32]),
        )
        .expect("id")
    }

    /// A minimal valid advert, for tests here and in the API.
    pub(crate) fn advert(node: PeerId, seq: u64, status: AdvertStatus) -> NodeAdvert {
        NodeAdvert {
            version: PROTOCOL_VERSION,
            node,
            seq,
            timestamp_ms: 0,
            ttl_secs: 10,
            status,
            payout: Address::default(),
            addrs: vec![],
            modules: vec![],
            capacity: 2,
            load: Load {
                running: seq as u32,
                waiting: 0,
            },
            tokens_generated: 0,
        }
    }

    #[test]
    fn adverts_replace_by_seq_expire_by_ttl_and_leave_at_once() {
        let node = tessera_protocol::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let t0 = Instant::now();
        let mut table = NodeTable::default();
        table.apply(
            &NetEvent::Rtt {
                peer: node,
                rtt: Duration::from_millis(3),
            },
            t0,
        );
        table.apply(
            &NetEvent::Advert(Box::new(advert(node, 5, AdvertStatus::Online))),
            t0,
        );
        let e = table.get(&node).expect("joined");
        assert_eq!(
            e.rtt,
            Some(Duration::from_millis(3)),
            "rtt seen before the advert is kept"
        );
        table.apply(
            &NetEvent::Advert(Box::new(advert(node, 4, AdvertStatus::Online))),
            t0,
        );
        assert_eq!(
            table.get(&node).expect("still").advert.seq,
            5,
            "older advert ignored"
        );
        table.apply(
            &NetEvent::Advert(Box::new(advert(node, 6, AdvertStatus::Online))),
            t0 + Duration::from_secs(5),
        );
        assert!(
            table.expire(t0 + Duration::from_secs(14)).is_empty(),
            "refreshed at 5 s, lives to 15 s"
        );
        assert_eq!(table.expire(t0 + Duration::from_secs(15)), vec![node]);
        assert!(table.is_empty());

        let feed = |table: &mut NodeTable, seq, status| {
            table.apply(&NetEvent::Advert(Box::new(advert(node, seq, status))), t0)
        };
        feed(&mut table, 7, AdvertStatus::Online);
        feed(&mut table, 9, AdvertStatus::Leaving);
        assert!(table.get(&node).is_none(), "leaving removes at once");
        feed(&mut table, 8, AdvertStatus::Online);
        assert!(
            table.get(&node).is_none(),
            "an advert older than the goodbye does not revive it"
        );
        feed(&mut table, 10, AdvertStatus::Online);
        assert!(
            table.get(&node).is_some(),
            "a node that comes back is welcome"
        );
    }

    #[test]
    fn pick_prefers_free_cheap_near_nodes_within_price() {
        use tessera_protocol::{Amount, LatencyStats, ModuleOffer};
        let module = module(3);
        let offer = |out: u128| ModuleOffer {
            module: module.clone(),
            alias: "m".into(),
            price: Price {
                per_1k_input: Amount(1),
                per_1k_output: Amount(out),
            },
            latency: LatencyStats::default(),
            numerics: "tessera-tiles-2".into(),
        };
        let t0 = Instant::now();
        let mut table = NodeTable::default();
        let mut ids = Vec::new();
        for (out, running) in [(10, 2), (30, 0), (20, 0), (5, 0)] {
            let peer = tessera_protocol::Keypair::generate_ed25519()
                .public()
                .to_peer_id();
            let mut a = advert(peer, 1, AdvertStatus::Online);
            a.modules = vec![offer(out)];
            a.load = Load {
                running,
                waiting: 0,
            };
            table.apply(&NetEvent::Advert(Box::new(a)), t0);
            ids.push(peer);
        }
        let max = Price {
            per_1k_input: Amount(1),
            per_1k_output: Amount(25),
        };
        // ids[0] is full (2 of 2), ids[1] too expensive; ids[3] is cheapest of the free ones.
        assert_eq!(table.pick(&module, &max), Some(ids[3]));
        let tight = Price {
            per_1k_input: Amount(1),
            per_1k_output: Amount(4),
        };
        assert_eq!(table.pick(&module, &tight), None, "nobody within price");
        let mut other = module.clone();
        other.context_length = 4096;
        assert_eq!(table.pick(&other, &max), None, "nobody serves it");
    }

    #[test]
    fn observed_throughput_is_smoothed() {
        let mut t = Throughput::default();
        t.record(11, Duration::from_secs(1), 100);
        assert_eq!((t.tokens_per_sec, t.ttft_ms), (10.0, 100.0));
        t.record(21, Duration::from_secs(1), 200);
        assert!((t.tokens_per_sec - 12.0).abs() < 1e-9);
        assert!((t.ttft_ms - 120.0).abs() < 1e-9);
        t.record(1, Duration::from_secs(1), 5);
        assert_eq!(t.jobs, 2, "single-token jobs say nothing about speed");
    }
}
