//! The Tessera coordinator: a live table of nodes built from the swarm's adverts, identify
//! and ping; a job client that streams jobs from nodes with deadlines and checked receipts
//! (`docs/network.md`); the ledger of accounts, API keys, reservations and receipts; and
//! the OpenAI-compatible HTTP API that routes, meters and settles jobs (`docs/api.md`);
//! and the rollup's sequencer, which posts what was settled to L1 (`docs/settlement.md`).

pub mod api;
pub mod audit;
pub mod client;
pub mod dashboard;
pub mod jobs;
pub mod l1;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod network;
pub mod openai;
pub mod route;
pub mod sequencer;
pub mod server;
pub mod table;

pub use audit::{AuditConfig, AuditRecord, Auditor, Dispute, NodeRecord, SlashStatus};
pub use client::{check_result, ClientError, JobClient, JobOutcome, JobSpec, JobStream};
pub use jobs::{DispatchConfig, Dispatcher};
pub use ledger::{ApiKey, Balance, Ledger, LedgerCheck, LedgerError, Settlement};
pub use limits::{Limiter, RateLimits};
pub use metrics::Metrics;
pub use network::{CoordinatorNet, CoordinatorNetError};
pub use sequencer::{
    AccountView, Fault, L1Setup, SequencerConfig, SequencerError, SequencerHandle, SequencerStatus,
    StatementRow,
};
pub use server::{Coordinator, CoordinatorConfig, SettlementConfig, StartError};
pub use table::{NodeEntry, NodeTable, Throughput};
