//! Routing: which node runs a job. Among the nodes serving the model (by alias or module
//! id), keep those whose price is within the caller's limit and whose quantization the
//! caller allows, skip those without a free slot, then order by expected completion
//! time (queue ahead × job time + time to first token + tokens × time per token + RTT),
//! with nodes that failed recently last. Callers may steer this with OpenRouter's
//! `provider` object: `sort`, `max_price`, `quantizations`, `allow_fallbacks`, `order`.

use crate::api::ApiError;
use crate::table::{NodeEntry, NodeTable};
use serde::Deserialize;
use std::time::{Duration, Instant};
use tessera_net::PeerId;
use tessera_protocol::{Address, Amount, ModuleOffer, Price};

/// A node that failed a job within this long is tried after every healthy one.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// Assumed before a node has measured anything.
const DEFAULT_TTFT: Duration = Duration::from_millis(500);
const DEFAULT_TPOT: Duration = Duration::from_millis(25);
const DEFAULT_RTT: Duration = Duration::from_millis(50);
/// Output tokens assumed when estimating a job's length (most answers end sooner than
/// their `max_tokens`).
const ESTIMATE_TOKENS: u32 = 256;

/// How the caller wants candidates ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// Lowest expected completion time (the default).
    #[default]
    #[serde(skip)]
    Completion,
    /// Cheapest first.
    Price,
    /// Lowest expected time to first token.
    Latency,
    /// Highest tokens per second.
    Throughput,
}

/// A price limit per million tokens, in base units (a number or an integer string), in
/// the manner of OpenRouter's `max_price`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxPrice {
    /// Per million prompt tokens.
    #[serde(default, deserialize_with = "amount_like")]
    pub prompt: Option<Amount>,
    /// Per million completion tokens.
    #[serde(default, deserialize_with = "amount_like")]
    pub completion: Option<Amount>,
}

fn amount_like<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Amount>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Like {
        Number(u64),
        Text(String),
    }
    match Option::<Like>::deserialize(d)? {
        None => Ok(None),
        Some(Like::Number(n)) => Ok(Some(Amount(u128::from(n)))),
        Some(Like::Text(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl MaxPrice {
    /// Whether `price` (per 1k) is within this limit (per 1M).
    pub fn admits(&self, price: &Price) -> bool {
        let ok = |limit: Option<Amount>, per_1k: Amount| {
            limit.is_none_or(|l| per_1k.0.checked_mul(1000).is_some_and(|p| p <= l.0))
        };
        ok(self.prompt, price.per_1k_input) && ok(self.completion, price.per_1k_output)
    }
}

/// OpenRouter-style routing preferences (`provider` in the request body).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ProviderPrefs {
    /// Ordering of candidates.
    #[serde(default)]
    pub sort: Option<Sort>,
    /// Highest acceptable price.
    #[serde(default)]
    pub max_price: Option<MaxPrice>,
    /// Quantizations allowed (`q4_1`, `q8_0`, …); any when absent.
    #[serde(default)]
    pub quantizations: Option<Vec<String>>,
    /// Whether another node may be tried when the first fails before its first token
    /// (default true).
    #[serde(default)]
    pub allow_fallbacks: Option<bool>,
    /// Node peer ids to try first, in this order.
    #[serde(default)]
    pub order: Option<Vec<String>>,
}

impl ProviderPrefs {
    /// Checks what serde could not.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(order) = &self.order {
            for id in order {
                if id.parse::<PeerId>().is_err() {
                    return Err(ApiError::invalid_request(format!(
                        "provider.order: {id:?} is not a node peer id"
                    ))
                    .with_param("provider"));
                }
            }
        }
        Ok(())
    }

    /// Whether fallbacks are allowed.
    pub fn allow_fallbacks(&self) -> bool {
        self.allow_fallbacks.unwrap_or(true)
    }
}

/// One node that can take the job, with why it ranks where it does.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The node.
    pub node: PeerId,
    /// Where its earnings are paid on L1 (its advert's payout address).
    pub payout: Address,
    /// What it offers for the model.
    pub offer: ModuleOffer,
    /// Expected time until the answer is complete.
    pub expected: Duration,
    /// Expected time until the first token.
    pub expected_first: Duration,
    /// Time per output token assumed.
    pub tpot: Duration,
    /// Whether it failed a job recently.
    pub failed_recently: bool,
    /// Jobs on it now (advertised, or dispatched by us since, whichever is more).
    pub load: u32,
    /// Its capacity.
    pub capacity: u32,
}

impl Candidate {
    /// Whether it can take one more job now.
    pub fn has_room(&self) -> bool {
        self.load < self.capacity
    }
}

/// Why no candidate list could be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No node on the network serves this model.
    UnknownModel,
    /// Nodes serve it, but none passes the caller's filters.
    Filtered(String),
}

/// Whether `offer` answers to `model` (its alias or its module id).
pub fn matches(offer: &ModuleOffer, model: &str) -> bool {
    offer.alias == model || offer.module.to_string() == model
}

/// Every node serving `model` that passes `prefs`' filters, best first (full nodes
/// included: the caller waits for room). `max_tokens` sizes the job for estimates.
pub fn candidates(
    table: &NodeTable,
    model: &str,
    prefs: &ProviderPrefs,
    max_tokens: u32,
    now: Instant,
) -> Result<Vec<Candidate>, RouteError> {
    let mut serving = 0usize;
    let mut priced_out = 0usize;
    let mut disputed = 0usize;
    let mut list: Vec<Candidate> = Vec::new();
    for entry in table.nodes() {
        for offer in entry.advert.modules.iter().filter(|o| matches(o, model)) {
            serving += 1;
            if table
                .standing(&entry.advert.node)
                .is_some_and(crate::audit::NodeRecord::excluded)
            {
                disputed += 1;
                continue;
            }
            if let Some(q) = &prefs.quantizations {
                if !q
                    .iter()
                    .any(|q| q.eq_ignore_ascii_case(offer.module.quantization.as_str()))
                {
                    continue;
                }
            }
            if prefs.max_price.is_some_and(|m| !m.admits(&offer.price)) {
                priced_out += 1;
                continue;
            }
            list.push(candidate(entry, offer, max_tokens, now));
        }
    }
    if serving == 0 {
        return Err(RouteError::UnknownModel);
    }
    if list.is_empty() {
        let why = if disputed == serving {
            format!("every node serving {model} failed an audit and is out of routing until its dispute is resolved")
        } else if priced_out > 0 {
            format!("no node serving {model} is within provider.max_price")
        } else {
            format!("no node serving {model} offers the quantizations in provider.quantizations")
        };
        return Err(RouteError::Filtered(why));
    }
    let sort = prefs.sort.unwrap_or_default();
    let price_key = |c: &Candidate| {
        c.offer
            .price
            .cost(ESTIMATE_TOKENS, max_tokens.min(ESTIMATE_TOKENS))
            .unwrap_or(Amount(u128::MAX))
    };
    list.sort_by(|a, b| {
        let primary = match sort {
            Sort::Completion => a.expected.cmp(&b.expected),
            Sort::Latency => a.expected_first.cmp(&b.expected_first),
            Sort::Throughput => a.tpot.cmp(&b.tpot),
            Sort::Price => price_key(a).cmp(&price_key(b)),
        };
        a.failed_recently
            .cmp(&b.failed_recently)
            .then(primary)
            .then(a.expected.cmp(&b.expected))
            .then(a.node.cmp(&b.node))
    });
    if let Some(order) = &prefs.order {
        let rank = |c: &Candidate| {
            order
                .iter()
                .position(|id| id == &c.node.to_string())
                .unwrap_or(usize::MAX)
        };
        list.sort_by_key(rank);
    }
    Ok(list)
}

fn candidate(entry: &NodeEntry, offer: &ModuleOffer, max_tokens: u32, now: Instant) -> Candidate {
    let ttft = offer
        .latency
        .p95_ttft_ms
        .map_or(DEFAULT_TTFT, |ms| Duration::from_millis(u64::from(ms)));
    let tpot = match (offer.latency.p95_tpot_us, entry.observed.tokens_per_sec) {
        (Some(us), _) => Duration::from_micros(u64::from(us)),
        (None, tps) if tps > 0.0 => Duration::from_secs_f64(1.0 / tps),
        _ => DEFAULT_TPOT,
    };
    let rtt = entry.rtt.unwrap_or(DEFAULT_RTT);
    let advertised = entry
        .advert
        .load
        .running
        .saturating_add(entry.advert.load.waiting);
    let load = advertised.max(entry.inflight);
    let tokens = max_tokens.min(ESTIMATE_TOKENS);
    let job = ttft + tpot * tokens;
    // The engine runs one job at a time: everything admitted before ours runs first.
    let queue = job * load;
    Candidate {
        node: entry.advert.node,
        payout: entry.advert.payout,
        offer: offer.clone(),
        expected: rtt + queue + job,
        expected_first: rtt + queue + ttft,
        tpot,
        failed_recently: entry
            .last_failure
            .is_some_and(|t| now.duration_since(t) < FAILURE_MEMORY),
        load,
        capacity: entry.advert.capacity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::tests::{advert, module};
    use tessera_net::NetEvent;
    use tessera_protocol::{AdvertStatus, Keypair, LatencyStats};

    struct Node {
        out_price: u128,
        quant: u32,
        ttft_ms: u32,
        tpot_us: u32,
        running: u32,
    }

    fn table(nodes: &[Node]) -> (NodeTable, Vec<PeerId>) {
        let mut t = NodeTable::default();
        let mut ids = Vec::new();
        for n in nodes {
            let peer = Keypair::generate_ed25519().public().to_peer_id();
            let mut a = advert(peer, 1, AdvertStatus::Online);
            a.capacity = 4;
            a.load.running = n.running;
            a.modules = vec![ModuleOffer {
                module: module(n.quant),
                alias: "m".into(),
                price: Price {
                    per_1k_input: Amount(1),
                    per_1k_output: Amount(n.out_price),
                },
                latency: LatencyStats {
                    samples: 10,
                    p95_ttft_ms: Some(n.ttft_ms),
                    p95_tpot_us: Some(n.tpot_us),
                },
                numerics: "tessera-tiles-2".into(),
            }];
            t.apply(&NetEvent::Advert(Box::new(a)), Instant::now());
            ids.push(peer);
        }
        (t, ids)
    }

    fn order(t: &NodeTable, prefs: &ProviderPrefs) -> Vec<PeerId> {
        candidates(t, "m", prefs, 64, Instant::now())
            .expect("candidates")
            .iter()
            .map(|c| c.node)
            .collect()
    }

    #[test]
    fn default_order_is_expected_completion_time_and_sort_steers_it() {
        let (t, ids) = table(&[
            // fast but expensive and busy
            Node {
                out_price: 900,
                quant: 3,
                ttft_ms: 50,
                tpot_us: 5_000,
                running: 2,
            },
            // idle, slow per token, cheap
            Node {
                out_price: 100,
                quant: 3,
                ttft_ms: 400,
                tpot_us: 20_000,
                running: 0,
            },
            // idle, fast first token, middling
            Node {
                out_price: 500,
                quant: 7,
                ttft_ms: 20,
                tpot_us: 10_000,
                running: 0,
            },
        ]);
        let none = ProviderPrefs::default();
        // expected: [2]: 20+640=660ms; [1]: 400+1280=1680; [0]: (50+320)*3=1110
        assert_eq!(order(&t, &none), vec![ids[2], ids[0], ids[1]]);
        let by = |sort| ProviderPrefs {
            sort: Some(sort),
            ..ProviderPrefs::default()
        };
        assert_eq!(order(&t, &by(Sort::Price)), vec![ids[1], ids[2], ids[0]]);
        assert_eq!(
            order(&t, &by(Sort::Throughput)),
            vec![ids[0], ids[2], ids[1]]
        );
        assert_eq!(order(&t, &by(Sort::Latency))[0], ids[2]);
        let only_q8 = ProviderPrefs {
            quantizations: Some(vec!["Q8_0".into()]),
            ..ProviderPrefs::default()
        };
        assert_eq!(order(&t, &only_q8), vec![ids[2]]);
        let cheap = ProviderPrefs {
            max_price: Some(MaxPrice {
                prompt: None,
                completion: Some(Amount(500_000)),
            }),
            ..ProviderPrefs::default()
        };
        assert_eq!(order(&t, &cheap), vec![ids[2], ids[1]]);
        let first = ProviderPrefs {
            order: Some(vec![ids[1].to_string()]),
            ..ProviderPrefs::default()
        };
        assert_eq!(order(&t, &first)[0], ids[1]);
    }

    #[test]
    fn recent_failures_go_last_and_filters_explain_themselves() {
        let (mut t, ids) = table(&[
            Node {
                out_price: 100,
                quant: 3,
                ttft_ms: 10,
                tpot_us: 1_000,
                running: 0,
            },
            Node {
                out_price: 100,
                quant: 3,
                ttft_ms: 900,
                tpot_us: 50_000,
                running: 0,
            },
        ]);
        assert_eq!(order(&t, &ProviderPrefs::default())[0], ids[0]);
        t.record_failure(&ids[0]);
        assert_eq!(order(&t, &ProviderPrefs::default()), vec![ids[1], ids[0]]);
        assert_eq!(
            candidates(&t, "other", &ProviderPrefs::default(), 16, Instant::now()).unwrap_err(),
            RouteError::UnknownModel
        );
        let cheap = ProviderPrefs {
            max_price: Some(MaxPrice {
                prompt: Some(Amount(1)),
                completion: None,
            }),
            ..ProviderPrefs::default()
        };
        assert!(matches!(
            candidates(&t, "m", &cheap, 16, Instant::now()),
            Err(RouteError::Filtered(why)) if why.contains("max_price")
        ));
        // The module id works as a model name too.
        assert_eq!(
            candidates(
                &t,
                &module(3).to_string(),
                &ProviderPrefs::default(),
                16,
                Instant::now()
            )
            .expect("by id")
            .len(),
            2
        );
    }

    #[test]
    fn max_price_is_per_million_and_accepts_numbers_or_strings() {
        let m: MaxPrice =
            serde_json::from_str(r#"{"prompt": 2000, "completion": "4000000"}"#).expect("parse");
        assert!(m.admits(&Price {
            per_1k_input: Amount(2),
            per_1k_output: Amount(4000)
        }));
        assert!(!m.admits(&Price {
            per_1k_input: Amount(3),
            per_1k_output: Amount(4000)
        }));
        assert!(serde_json::from_str::<MaxPrice>(r#"{"prompt": -1}"#).is_err());
    }
}
