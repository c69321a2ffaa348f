//! Measured latency per module: a window of recent jobs and its 95th percentiles, which
//! adverts carry so routers can predict completion times.

use tessera_protocol::LatencyStats;

/// Jobs remembered per module.
const WINDOW: usize = 128;

/// The last [`WINDOW`] samples of one figure.
#[derive(Debug, Default)]
struct Ring {
    samples: Vec<u32>,
    next: usize,
}

impl Ring {
    fn push(&mut self, v: u32) {
        if self.samples.len() < WINDOW {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % WINDOW;
    }
}

/// The latest jobs' time to first token and time per output token.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    ttft_ms: Ring,
    tpot_us: Ring,
}

fn p95(samples: &[u32]) -> Option<u32> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    // Nearest-rank percentile.
    let rank = (samples.len() * 95).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

impl LatencyWindow {
    /// Records one finished job; `tpot_us` is `None` when it produced at most one token.
    pub fn record(&mut self, ttft_ms: u32, tpot_us: Option<u32>) {
        self.ttft_ms.push(ttft_ms);
        if let Some(t) = tpot_us {
            self.tpot_us.push(t);
        }
    }

    /// The advert's figures.
    pub fn stats(&self) -> LatencyStats {
        LatencyStats {
            samples: self.ttft_ms.samples.len() as u32,
            p95_ttft_ms: p95(&self.ttft_ms.samples),
            p95_tpot_us: p95(&self.tpot_us.samples),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_nearest_rank_over_the_window() {
        let mut w = LatencyWindow::default();
        assert_eq!(w.stats().p95_ttft_ms, None);
        for i in 1..=100 {
            w.record(i, Some(i * 10));
        }
        let s = w.stats();
        assert_eq!(
            (s.samples, s.p95_ttft_ms, s.p95_tpot_us),
            (100, Some(95), Some(950))
        );
        for _ in 0..WINDOW {
            w.record(7, None);
        }
        let s = w.stats();
        assert_eq!(s.p95_ttft_ms, Some(7), "old samples leave the window");
        assert_eq!(s.samples, WINDOW as u32);
    }
}
