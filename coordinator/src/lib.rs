//! The Tessera coordinator. Its network side: a live table of nodes built from the swarm's
//! adverts, identify and ping, and a job client that streams jobs from nodes with
//! deadlines and checked receipts. The HTTP API sits on top of this (`docs/network.md`).

pub mod client;
pub mod ledger;
pub mod network;
pub mod table;

pub use client::{check_result, ClientError, JobClient, JobOutcome, JobSpec, JobStream};
pub use ledger::{ApiKey, Balance, Ledger, LedgerError, Settlement};
pub use network::{CoordinatorNet, CoordinatorNetError};
pub use table::{NodeEntry, NodeTable, Throughput};
