//! Per-account rate limits: a token bucket of requests per minute (bursts up to a minute's
//! worth) and a cap on jobs running at once. Over either, the API answers 429 with
//! `Retry-After`, before any money is reserved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits, per account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute (the bucket's size and refill rate).
    pub requests_per_minute: u32,
    /// Jobs running at once.
    pub concurrent_jobs: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            requests_per_minute: 600,
            concurrent_jobs: 64,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    /// Too many requests this minute; retry after this long.
    Rate(Duration),
    /// Too many jobs running.
    Concurrency(u32),
}

#[derive(Debug)]
struct Account {
    tokens: f64,
    refilled: Instant,
    running: u32,
}

/// Counts requests and running jobs per account.
#[derive(Debug, Clone)]
pub struct Limiter {
    limits: RateLimits,
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

/// A running job's place in its account's concurrency count; dropping it frees the place.
#[derive(Debug)]
pub struct Permit {
    account: String,
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut accounts) = self.accounts.lock() {
            if let Some(a) = accounts.get_mut(&self.account) {
                a.running = a.running.saturating_sub(1);
            }
        }
    }
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            accounts: Arc::default(),
        }
    }

    /// Takes one request from `account`'s bucket and one running-job place, or says why not.
    pub fn admit(&self, account: &str, now: Instant) -> Result<Permit, Limited> {
        let mut accounts = self
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let size = f64::from(self.limits.requests_per_minute.max(1));
        let a = accounts.entry(account.to_owned()).or_insert(Account {
            tokens: size,
            refilled: now,
            running: 0,
        });
        let per_sec = size / 60.0;
        a.tokens = (a.tokens + now.duration_since(a.refilled).as_secs_f64() * per_sec).min(size);
        a.refilled = now;
        if a.running >= self.limits.concurrent_jobs {
            return Err(Limited::Concurrency(self.limits.concurrent_jobs));
        }
        if a.tokens < 1.0 {
            return Err(Limited::Rate(Duration::from_secs_f64(
                (1.0 - a.tokens) / per_sec,
            )));
        }
        a.tokens -= 1.0;
        a.running += 1;
        Ok(Permit {
            account: account.to_owned(),
            accounts: self.accounts.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_up_to_the_bucket_then_refills_with_time() {
        let l = Limiter::new(RateLimits {
            requests_per_minute: 3,
            concurrent_jobs: 100,
        });
        let t = Instant::now();
        let permits: Vec<_> = (0..3).map(|_| l.admit("a", t).expect("burst")).collect();
        let Err(Limited::Rate(wait)) = l.admit("a", t) else {
            panic!("fourth request in the same instant must be limited")
        };
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(l.admit("b", t).is_ok(), "accounts are limited separately");
        assert!(
            l.admit("a", t + Duration::from_secs(20)).is_ok(),
            "refilled"
        );
        drop(permits);
    }

    #[test]
    fn running_jobs_are_capped_and_freed_on_drop() {
        let l = Limiter::new(RateLimits {
            requests_per_minute: 1000,
            concurrent_jobs: 2,
        });
        let t = Instant::now();
        let a = l.admit("a", t).expect("1");
        let _b = l.admit("a", t).expect("2");
        assert_eq!(l.admit("a", t).unwrap_err(), Limited::Concurrency(2));
        drop(a);
        assert!(l.admit("a", t).is_ok());
    }
}
