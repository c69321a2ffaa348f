//! Relayed connections: the bytes each one carries, counted where the relay counts them
//! (the circuit under Noise and Yamux), and the limits its relay granted, so a job on a
//! circuit can end cleanly before the relay cuts it.

use futures::io::{AsyncRead, AsyncWrite};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::PeerId;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Circuits counted but not yet claimed by the swarm task; more than this and the oldest
/// is forgotten (its connection then has no byte count).
const MAX_UNCLAIMED: usize = 64;

/// The metrics' relayed-byte counters (shared: a clone counts into the same figure).
#[derive(Clone, Debug)]
pub(crate) struct RelayedTotals {
    pub read: prometheus_client::metrics::counter::Counter,
    pub written: prometheus_client::metrics::counter::Counter,
}

/// Byte counters of circuits the transport opened, waiting for the swarm task to match
/// them to their connection.
#[derive(Default)]
pub(crate) struct Unclaimed(Mutex<VecDeque<(PeerId, Arc<AtomicU64>)>>);

impl Unclaimed {
    fn push(&self, peer: PeerId, bytes: Arc<AtomicU64>) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() >= MAX_UNCLAIMED {
                q.pop_front();
            }
            q.push_back((peer, bytes));
        }
    }

    /// The newest counter opened to or from `peer`.
    pub(crate) fn claim(&self, peer: &PeerId) -> Option<Arc<AtomicU64>> {
        let mut q = self.0.lock().ok()?;
        let i = q.iter().rposition(|(p, _)| p == peer)?;
        q.remove(i).map(|(_, b)| b)
    }
}

/// Wraps each circuit the relay transport yields in a byte counter.
pub(crate) fn count<C>(
    conn: C,
    endpoint: ConnectedPoint,
    unclaimed: &Arc<Unclaimed>,
    totals: &RelayedTotals,
) -> Counted<C> {
    let bytes = Arc::new(AtomicU64::new(0));
    // The remote peer ends both a dialed circuit (`…/p2p-circuit/p2p/DST`) and an
    // accepted one (`/p2p/SRC`).
    let peer = endpoint
        .get_remote_address()
        .iter()
        .fold(None, |last, p| match p {
            Protocol::P2p(id) => Some(id),
            _ => last,
        });
    if let Some(peer) = peer {
        unclaimed.push(peer, bytes.clone());
    }
    Counted {
        inner: conn,
        bytes,
        totals: totals.clone(),
    }
}

/// A circuit that counts what crosses it.
pub(crate) struct Counted<C> {
    inner: C,
    bytes: Arc<AtomicU64>,
    totals: RelayedTotals,
}

impl<C: AsyncRead + Unpin> AsyncRead for Counted<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
            this.totals.read.inc_by(n as u64);
        }
        poll
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counted<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
            this.totals.written.inc_by(n as u64);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// What is left of one relay circuit: its relay cuts it at `duration` or `bytes_limit`
/// (both directions together), whichever comes first.
#[derive(Clone, Debug)]
pub struct CircuitBudget {
    /// When the circuit opened.
    pub opened: Instant,
    /// Longest it stays open (`None`: the relay set no limit).
    pub duration: Option<Duration>,
    /// Most bytes it carries (`None`: no limit).
    pub bytes_limit: Option<u64>,
    bytes: Option<Arc<AtomicU64>>,
}

impl CircuitBudget {
    /// A budget from a relay's limit, counting with `bytes` when the circuit was counted.
    pub(crate) fn new(
        opened: Instant,
        duration: Option<Duration>,
        bytes_limit: Option<u64>,
        bytes: Option<Arc<AtomicU64>>,
    ) -> Self {
        Self {
            opened,
            duration,
            bytes_limit,
            bytes,
        }
    }

    /// The same circuit with the limits its relay granted.
    pub(crate) fn with_limits(self, duration: Option<Duration>, bytes_limit: Option<u64>) -> Self {
        Self {
            duration,
            bytes_limit,
            ..self
        }
    }

    /// Bytes the circuit has carried so far (0 when it is not counted).
    pub fn bytes_used(&self) -> u64 {
        self.bytes.as_ref().map_or(0, |b| b.load(Ordering::Relaxed))
    }

    /// Time until the relay closes it (`None`: no time limit).
    pub fn time_left(&self, now: Instant) -> Option<Duration> {
        self.duration
            .map(|d| (self.opened + d).saturating_duration_since(now))
    }

    /// Bytes it may still carry (`None`: no byte limit).
    pub fn bytes_left(&self) -> Option<u64> {
        self.bytes_limit
            .map(|l| l.saturating_sub(self.bytes_used()))
    }

    /// Whether a job that has sent `tokens` tokens must end now to finish inside the
    /// circuit: it keeps room for its transcript and result (`bytes_per_token` each, plus
    /// 16 KiB) and a time margin of a fifth of the circuit's life (2 to 15 seconds).
    pub fn must_end(&self, now: Instant, tokens: u64, bytes_per_token: u64) -> bool {
        if let (Some(d), Some(left)) = (self.duration, self.time_left(now)) {
            let margin = (d / 5).clamp(Duration::from_secs(2), Duration::from_secs(15));
            if left <= margin {
                return true;
            }
        }
        if let (Some(limit), Some(left)) = (self.bytes_limit, self.bytes_left()) {
            // Room for what is still to send, plus a tenth of the circuit for the traffic
            // the job shares it with (pings, gossip).
            let reserve = tokens
                .saturating_mul(bytes_per_token)
                .saturating_add(16 << 10)
                .saturating_add(limit / 10);
            if left <= reserve {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_ends_a_job_before_its_circuit_runs_out() {
        let t0 = Instant::now();
        let bytes = Arc::new(AtomicU64::new(0));
        let b = CircuitBudget::new(
            t0,
            Some(Duration::from_secs(20)),
            Some(1 << 20),
            Some(bytes.clone()),
        );
        assert!(!b.must_end(t0, 0, 128));
        assert!(!b.must_end(t0 + Duration::from_secs(15), 10, 128));
        assert!(
            b.must_end(t0 + Duration::from_secs(16), 10, 128),
            "4 s margin on a 20 s circuit"
        );
        bytes.store(800 << 10, Ordering::Relaxed);
        assert!(!b.must_end(t0, 10, 128));
        assert!(b.must_end(t0, 1000, 128), "the transcript would not fit");
        let unlimited = CircuitBudget::new(t0, None, None, None);
        assert!(!unlimited.must_end(t0 + Duration::from_secs(86_400), 1 << 20, 128));
    }

    #[test]
    fn counters_are_claimed_by_their_peer_newest_first() {
        let u = Unclaimed::default();
        let (p, q) = (PeerId::random(), PeerId::random());
        let (a, b) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(2)));
        u.push(p, a);
        u.push(p, b);
        u.push(q, Arc::new(AtomicU64::new(3)));
        assert_eq!(u.claim(&p).map(|c| c.load(Ordering::Relaxed)), Some(2));
        assert_eq!(u.claim(&p).map(|c| c.load(Ordering::Relaxed)), Some(1));
        assert!(u.claim(&p).is_none());
        for _ in 0..MAX_UNCLAIMED + 5 {
            u.push(p, Arc::new(AtomicU64::new(0)));
        }
        assert!(
            u.claim(&q).is_none(),
            "the oldest are forgotten past the bound"
        );
    }
}
