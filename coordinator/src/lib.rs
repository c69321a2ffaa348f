//! The Tessera coordinator: a live table of nodes built from the swarm's adverts, identify
//! and ping; a job client that streams jobs from nodes with deadlines and checked receipts
//! (`docs/network.md`); and the ledger of accounts, API keys, reservations and receipts.
//! The HTTP API sits on top of these.

pub mod api;
pub mod client;
pub mod ledger;
pub mod network;
pub mod table;

pub use client::{check_result, ClientError, JobClient, JobOutcome, JobSpec, JobStream};
pub use ledger::{ApiKey, Balance, Ledger, LedgerCheck, LedgerError, Settlement};
pub use network::{CoordinatorNet, CoordinatorNetError};
pub use table::{NodeEntry, NodeTable, Throughput};
