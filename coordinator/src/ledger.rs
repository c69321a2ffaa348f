//! The coordinator's ledger, in an embedded database (redb): accounts with balances in
//! base units, API keys stored as hashes, a reservation per running job, and receipts.
//! Every money movement is one write transaction: a receipt and the balance change it
//! causes commit together or not at all, and a job settles at most once, so a crash
//! (tested by killing a process mid-stream of commits) loses neither and doubles neither.

use crate::audit::{AuditRecord, Dispute, NodeRecord, SlashStatus};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use tessera_protocol::job::MAX_EVENT_FRAME;
use tessera_protocol::{Address, Amount, JobId, Receipt, Signed};

/// account id → (credited, charged, reserved), base units. Balance = credited − charged;
/// available = balance − reserved.
const ACCOUNTS: TableDefinition<&str, (u128, u128, u128)> = TableDefinition::new("accounts");
/// node peer id → (base units earned, jobs settled): the other side of every charge.
const NODES: TableDefinition<&str, (u128, u64)> = TableDefinition::new("node_earnings");
/// blake3(api key) → account id.
const KEYS: TableDefinition<&[u8; 32], &str> = TableDefinition::new("api_keys");
/// job id → (account id, amount reserved).
const RESERVATIONS: TableDefinition<&[u8; 16], (&str, u128)> = TableDefinition::new("reservations");
/// job id → (account id, amount charged, encoded signed receipt).
const RECEIPTS: TableDefinition<&[u8; 16], (&str, u128, &[u8])> = TableDefinition::new("receipts");
/// account id → its L1 address (deposits from that address credit the account).
const LINKS: TableDefinition<&str, &[u8; 20]> = TableDefinition::new("account_links");
/// L1 address → account id.
const LINKED: TableDefinition<&[u8; 20], &str> = TableDefinition::new("address_links");
/// Settled jobs not yet in a posted batch: job id → (account, cost, node payout address,
/// receipt leaf). Written with the receipt, in the same transaction.
const UNBATCHED: TableDefinition<&[u8; 16], UnbatchedRow<'_>> =
    TableDefinition::new("unbatched_receipts");
/// (account, cost, payout address, receipt leaf).
type UnbatchedRow<'a> = (&'a str, u128, &'a [u8; 20], &'a [u8; 32]);
/// Receipts root of a posted settlement → the jobs it settles (JSON rows), so a reverted
/// batch's jobs go back to unbatched and none is settled twice or lost.
const POSTED: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("posted_receipts");
/// L1 deposit queue positions already credited to a linked account.
const DEPOSITS_SEEN: TableDefinition<u64, ()> = TableDefinition::new("deposits_seen");
/// node peer id → its standing (JSON [`NodeRecord`]).
const STANDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_standings");
/// audited job id → the audit (JSON [`AuditRecord`]).
const AUDITS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("audits");
/// audited job id → the dispute a failed audit opened (JSON [`Dispute`]).
const DISPUTES: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("disputes");

/// job id → what the coordinator saw of the request (JSON [`RequestMeta`]), written with
/// the receipt, so usage lists a request the moment its response ends.
const REQUESTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("request_meta");
/// (account, job id) → (): an account's requests, read by prefix.
const ACCOUNT_JOBS: TableDefinition<(&str, &[u8; 16]), ()> = TableDefinition::new("account_jobs");
/// (node peer id, finished unix ms, job id) → (): a node's jobs, newest last.
const NODE_JOBS: TableDefinition<(&str, u64, &[u8; 16]), ()> = TableDefinition::new("node_jobs");
/// job id → the receipts root of the posted settlement that carries it.
const JOB_ROOTS: TableDefinition<&[u8; 16], &[u8; 32]> = TableDefinition::new("job_roots");

/// Longest account id, in bytes (the wire's payer limit).
pub const MAX_ACCOUNT_BYTES: usize = tessera_protocol::job::MAX_PAYER_BYTES;

/// Why a ledger operation did not happen. Nothing was written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database failed (disk, corruption).
    #[error("ledger database: {0}")]
    Db(#[from] redb::Error),
    /// Another process (a running coordinator) holds the ledger.
    #[error("ledger {0} is in use by another process (a running coordinator?): stop it first")]
    InUse(String),
    /// No such account.
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    /// The account already exists.
    #[error("account {0:?} already exists")]
    AccountExists(String),
    /// Account ids are 1–64 bytes of letters, digits, `-`, `_` and `.`.
    #[error("account id {0:?} must be 1-64 characters of letters, digits, '-', '_' or '.'")]
    BadAccountId(String),
    /// The API key matches no account.
    #[error("invalid API key")]
    BadKey,
    /// Not enough available balance for the reservation.
    #[error("insufficient balance: {needed} needed, {available} available")]
    InsufficientBalance {
        /// What the job may cost at most.
        needed: Amount,
        /// Balance minus other reservations.
        available: Amount,
    },
    /// A reservation for this job already exists.
    #[error("job {0} already has a reservation")]
    DuplicateJob(JobId),
    /// No reservation for this job (never made, released, or settled).
    #[error("job {0} has no open reservation")]
    NoReservation(JobId),
    /// The job was settled before: the same receipt is never charged twice.
    #[error("job {0} is already settled")]
    AlreadySettled(JobId),
    /// The receipt is for another job, or an amount overflows.
    #[error("receipt rejected: {0}")]
    BadReceipt(String),
    /// No such dispute, or it cannot change that way (closing a closed one).
    #[error("{0}")]
    Dispute(String),
    /// A stored audit record cannot be read or written.
    #[error("audit record: {0}")]
    AuditRecord(String),
}

fn db<E: Into<redb::Error>>(e: E) -> LedgerError {
    LedgerError::Db(e.into())
}

/// An account's money.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    /// Everything credited minus everything charged.
    pub balance: Amount,
    /// Held for running jobs.
    pub reserved: Amount,
    /// Everything ever credited.
    pub credited: Amount,
    /// Everything ever charged (the sum of this account's receipts).
    pub charged: Amount,
}

impl Balance {
    fn from_row((credited, charged, reserved): (u128, u128, u128)) -> Self {
        Self {
            balance: Amount(credited.saturating_sub(charged)),
            reserved: Amount(reserved),
            credited: Amount(credited),
            charged: Amount(charged),
        }
    }

    /// What a new job may reserve.
    pub fn available(&self) -> Amount {
        Amount(self.balance.0.saturating_sub(self.reserved.0))
    }

    /// `account`'s money as the API and the CLI show it (amounts as integer strings).
    pub fn to_json(&self, account: &str) -> serde_json::Value {
        serde_json::json!({
            "account": account,
            "balance": self.balance,
            "reserved": self.reserved,
            "available": self.available(),
            "credited": self.credited,
            "charged": self.charged,
        })
    }
}

/// One node's side of the books.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeCredit {
    /// Peer id.
    pub node: String,
    /// Base units earned.
    pub earned: Amount,
    /// Jobs settled.
    pub jobs: u64,
}

/// The ledger's books, totalled, with every invariant that failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerCheck {
    /// Accounts.
    pub accounts: u64,
    /// Sum of credits.
    pub credited: Amount,
    /// Sum of account charges (debits).
    pub charged: Amount,
    /// Sum of open reservations as the accounts hold them.
    pub reserved: Amount,
    /// Open reservations (jobs running, or left by a crash until the next start).
    pub open_reservations: u64,
    /// Receipts stored.
    pub receipts: u64,
    /// Sum charged over the stored receipts.
    pub receipts_charged: Amount,
    /// Sum credited to nodes.
    pub node_credits: Amount,
    /// What each node was credited.
    pub nodes: Vec<NodeCredit>,
    /// Invariants that do not hold; empty when the books balance.
    pub problems: Vec<String>,
}

/// What settling a job did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// Charged to the account (the receipt's cost, never more than was reserved).
    pub charged: Amount,
    /// Reserved but not charged: available again.
    pub released: Amount,
}

/// A new API key: shown once, stored only as a hash.
pub struct ApiKey(String);

impl ApiKey {
    /// The secret, to hand to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

fn key_hash(key: &str) -> [u8; 32] {
    *blake3::Hasher::new_derive_key("tessera api key v1")
        .update(key.as_bytes())
        .finalize()
        .as_bytes()
}

pub(crate) fn check_account_id(id: &str) -> Result<(), LedgerError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ACCOUNT_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadAccountId(id.to_owned()))
    }
}

/// The ledger: one file, many readers, one writer at a time.
pub struct Ledger {
    db: Database,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let database = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                LedgerError::InUse(path.display().to_string())
            }
            e => db(e),
        })?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(ACCOUNTS).map_err(db)?;
        tx.open_table(NODES).map_err(db)?;
        tx.open_table(KEYS).map_err(db)?;
        tx.open_table(RESERVATIONS).map_err(db)?;
        tx.open_table(RECEIPTS).map_err(db)?;
        tx.open_table(LINKS).map_err(db)?;
        tx.open_table(LINKED).map_err(db)?;
        tx.open_table(UNBATCHED).map_err(db)?;
        tx.open_table(POSTED).map_err(db)?;
        tx.open_table(REQUESTS).map_err(db)?;
        tx.open_table(ACCOUNT_JOBS).map_err(db)?;
        tx.open_table(JOB_ROOTS).map_err(db)?;
        tx.open_table(NODE_JOBS).map_err(db)?;
        tx.open_table(DEPOSITS_SEEN).map_err(db)?;
        backfill_indexes(&tx)?;
        tx.open_table(STANDINGS).map_err(db)?;
        tx.open_table(AUDITS).map_err(db)?;
        tx.open_table(DISPUTES).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Self { db: database })
    }

    /// Creates an empty account.
    pub fn create_account(&self, id: &str) -> Result<(), LedgerError> {
        check_account_id(id)?;
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            if accounts.get(id).map_err(db)?.is_some() {
                return Err(LedgerError::AccountExists(id.to_owned()));
            }
            accounts.insert(id, (0u128, 0u128, 0u128)).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Issues a new API key for `account`; only its hash is stored.
    pub fn create_key(&self, account: &str) -> Result<ApiKey, LedgerError> {
        let secret = format!("tsk_{}", hex::encode(random_bytes()));
        let tx = self.db.begin_write().map_err(db)?;
        {
            if tx
                .open_table(ACCOUNTS)
                .map_err(db)?
                .get(account)
                .map_err(db)?
                .is_none()
            {
                return Err(LedgerError::UnknownAccount(account.to_owned()));
            }
            tx.open_table(KEYS)
                .map_err(db)?
                .insert(&key_hash(&secret), account)
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(ApiKey(secret))
    }

    /// The account an API key belongs to.
    pub fn authenticate(&self, key: &str) -> Result<String, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let keys = tx.open_table(KEYS).map_err(db)?;
        let account = keys
            .get(&key_hash(key))
            .map_err(db)?
            .ok_or(LedgerError::BadKey)?;
        Ok(account.value().to_owned())
    }

    /// An account's balance and reservations.
    pub fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let accounts = tx.open_table(ACCOUNTS).map_err(db)?;
        Ok(Balance::from_row(read_account(&accounts, account)?))
    }

    /// Every account with its money, in id order.
    pub fn accounts(&self) -> Result<Vec<(String, Balance)>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let accounts = tx.open_table(ACCOUNTS).map_err(db)?;
        let mut out = Vec::new();
        for row in accounts.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((k.value().to_owned(), Balance::from_row(v.value())));
        }
        Ok(out)
    }

    /// Adds `amount` to an account (admin credit; deposits replace it later).
    pub fn credit(&self, account: &str, amount: Amount) -> Result<Balance, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let after = {
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let (credited, charged, reserved) = read_account(&accounts, account)?;
            let credited = credited
                .checked_add(amount.0)
                .ok_or_else(|| LedgerError::BadReceipt("balance overflows".into()))?;
            let row = (credited, charged, reserved);
            accounts.insert(account, row).map_err(db)?;
            Balance::from_row(row)
        };
        tx.commit().map_err(db)?;
        Ok(after)
    }

    /// Holds `amount` of `account`'s available balance for `job`.
    pub fn reserve(&self, account: &str, job: JobId, amount: Amount) -> Result<(), LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut reservations = tx.open_table(RESERVATIONS).map_err(db)?;
            if reservations.get(&job.0).map_err(db)?.is_some()
                || tx
                    .open_table(RECEIPTS)
                    .map_err(db)?
                    .get(&job.0)
                    .map_err(db)?
                    .is_some()
            {
                return Err(LedgerError::DuplicateJob(job));
            }
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let (credited, charged, reserved) = read_account(&accounts, account)?;
            let available = credited.saturating_sub(charged).saturating_sub(reserved);
            if amount.0 > available {
                return Err(LedgerError::InsufficientBalance {
                    needed: amount,
                    available: Amount(available),
                });
            }
            accounts
                .insert(account, (credited, charged, reserved + amount.0))
                .map_err(db)?;
            reservations
                .insert(&job.0, (account, amount.0))
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Gives a failed job's reservation back, charging nothing.
    pub fn release(&self, job: JobId) -> Result<Amount, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let amount = {
            let mut reservations = tx.open_table(RESERVATIONS).map_err(db)?;
            let (account, amount) = take_reservation(&mut reservations, job)?;
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let (credited, charged, reserved) = read_account(&accounts, account.as_str())?;
            accounts
                .insert(
                    account.as_str(),
                    (credited, charged, reserved.saturating_sub(amount)),
                )
                .map_err(db)?;
            Amount(amount)
        };
        tx.commit().map_err(db)?;
        Ok(amount)
    }

    /// As [`Ledger::settle_request`], without the request's metadata.
    pub fn settle(
        &self,
        job: JobId,
        receipt: &Signed<Receipt>,
        payout: &Address,
    ) -> Result<Settlement, LedgerError> {
        self.settle_request(job, receipt, payout, None)
    }

    /// Settles `job` with its node-signed receipt, in one transaction: the receipt is
    /// stored, the account charged the receipt's cost (capped at the reservation), and the
    /// rest of the reservation released, and the job queued for the rollup's next batch
    /// (paying `payout`, the node's L1 address). A second settle of the same job is
    /// refused. `meta` (what the coordinator saw of the request) is stored with it.
    pub fn settle_request(
        &self,
        job: JobId,
        receipt: &Signed<Receipt>,
        payout: &Address,
        meta: Option<&RequestMeta>,
    ) -> Result<Settlement, LedgerError> {
        let meta = meta
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| LedgerError::BadReceipt(e.to_string()))?;
        if receipt.body.job_id != job {
            return Err(LedgerError::BadReceipt(format!(
                "receipt is for job {}, not {job}",
                receipt.body.job_id
            )));
        }
        let encoded = tessera_protocol::wire::encode(receipt, MAX_EVENT_FRAME)
            .map_err(|e| LedgerError::BadReceipt(e.to_string()))?;
        let tx = self.db.begin_write().map_err(db)?;
        let settlement = {
            let mut receipts = tx.open_table(RECEIPTS).map_err(db)?;
            if receipts.get(&job.0).map_err(db)?.is_some() {
                return Err(LedgerError::AlreadySettled(job));
            }
            let mut reservations = tx.open_table(RESERVATIONS).map_err(db)?;
            let (account, held) = take_reservation(&mut reservations, job)?;
            let cost = receipt.body.cost.0.min(held);
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let (credited, charged, reserved) = read_account(&accounts, account.as_str())?;
            // Invariants: reserved ≥ held (it includes this reservation) and
            // credited − charged ≥ reserved (reserve checks available balance).
            accounts
                .insert(
                    account.as_str(),
                    (credited, charged + cost, reserved.saturating_sub(held)),
                )
                .map_err(db)?;
            let mut nodes = tx.open_table(NODES).map_err(db)?;
            let node = receipt.body.node.to_string();
            let (earned, jobs) = nodes
                .get(node.as_str())
                .map_err(db)?
                .map_or((0, 0), |v| v.value());
            let earned = earned
                .checked_add(cost)
                .ok_or_else(|| LedgerError::BadReceipt("node earnings overflow".into()))?;
            nodes
                .insert(node.as_str(), (earned, jobs + 1))
                .map_err(db)?;
            receipts
                .insert(&job.0, (account.as_str(), cost, encoded.as_slice()))
                .map_err(db)?;
            tx.open_table(ACCOUNT_JOBS)
                .map_err(db)?
                .insert((account.as_str(), &job.0), ())
                .map_err(db)?;
            tx.open_table(NODE_JOBS)
                .map_err(db)?
                .insert((node.as_str(), receipt.body.finished_ms, &job.0), ())
                .map_err(db)?;
            if let Some(meta) = &meta {
                tx.open_table(REQUESTS)
                    .map_err(db)?
                    .insert(&job.0, meta.as_slice())
                    .map_err(db)?;
            }
            if cost > 0 {
                let leaf = tessera_rollup::keccak256(&encoded);
                tx.open_table(UNBATCHED)
                    .map_err(db)?
                    .insert(&job.0, (account.as_str(), cost, &payout.0, &leaf))
                    .map_err(db)?;
            }
            let charged = cost;
            Settlement {
                charged: Amount(charged),
                released: Amount(held - charged),
            }
        };
        tx.commit().map_err(db)?;
        Ok(settlement)
    }

    /// The stored receipt of a settled job, with the account charged and the amount.
    pub fn receipt(
        &self,
        job: JobId,
    ) -> Result<Option<(String, Amount, Signed<Receipt>)>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let receipts = tx.open_table(RECEIPTS).map_err(db)?;
        let Some(row) = receipts.get(&job.0).map_err(db)? else {
            return Ok(None);
        };
        let (account, charged, bytes) = row.value();
        let signed = tessera_protocol::wire::decode(bytes, MAX_EVENT_FRAME)
            .map_err(|e| LedgerError::BadReceipt(format!("stored receipt unreadable: {e}")))?;
        Ok(Some((account.to_owned(), Amount(charged), signed)))
    }
}

impl Ledger {
    /// Releases every open reservation, in one transaction: run at start, when no job can
    /// be running, so holds left by a crash become available again (their jobs died with
    /// the process, and their nodes stopped when the streams broke). Returns how many.
    pub fn recover(&self) -> Result<(u64, Amount), LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let (count, total) = {
            let mut reservations = tx.open_table(RESERVATIONS).map_err(db)?;
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let mut held: Vec<(String, u128)> = Vec::new();
            for row in reservations.iter().map_err(db)? {
                let (_, v) = row.map_err(db)?;
                let (account, amount) = v.value();
                held.push((account.to_owned(), amount));
            }
            reservations.retain(|_, _| false).map_err(db)?;
            let mut total = 0u128;
            for (account, amount) in &held {
                let (credited, charged, reserved) = read_account(&accounts, account)?;
                accounts
                    .insert(
                        account.as_str(),
                        (credited, charged, reserved.saturating_sub(*amount)),
                    )
                    .map_err(db)?;
                total += amount;
            }
            (held.len() as u64, Amount(total))
        };
        tx.commit().map_err(db)?;
        Ok((count, total))
    }

    /// Totals the books and checks that they balance: each account's charges equal its
    /// receipts, its reservation equals its open holds, and what nodes were credited
    /// equals what accounts were charged.
    pub fn check(&self) -> Result<LedgerCheck, LedgerError> {
        use std::collections::BTreeMap;
        let tx = self.db.begin_read().map_err(db)?;
        let mut out = LedgerCheck::default();
        let mut per_account: BTreeMap<String, (u128, u128)> = BTreeMap::new();
        for row in tx.open_table(RECEIPTS).map_err(db)?.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let (account, charged, _) = v.value();
            out.receipts += 1;
            out.receipts_charged.0 += charged;
            per_account.entry(account.to_owned()).or_default().0 += charged;
        }
        for row in tx
            .open_table(RESERVATIONS)
            .map_err(db)?
            .iter()
            .map_err(db)?
        {
            let (_, v) = row.map_err(db)?;
            let (account, held) = v.value();
            out.open_reservations += 1;
            per_account.entry(account.to_owned()).or_default().1 += held;
        }
        for row in tx.open_table(ACCOUNTS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let (credited, charged, reserved) = v.value();
            out.accounts += 1;
            out.credited.0 += credited;
            out.charged.0 += charged;
            out.reserved.0 += reserved;
            let (receipts, holds) = per_account.remove(k.value()).unwrap_or_default();
            if charged != receipts {
                out.problems.push(format!(
                    "account {}: charged {charged} but its receipts sum to {receipts}",
                    k.value()
                ));
            }
            if reserved != holds {
                out.problems.push(format!(
                    "account {}: reserved {reserved} but its open holds sum to {holds}",
                    k.value()
                ));
            }
            if charged + reserved > credited {
                out.problems.push(format!(
                    "account {}: charged and reserved exceed credits",
                    k.value()
                ));
            }
        }
        for account in per_account.keys() {
            out.problems
                .push(format!("receipts or holds name unknown account {account}"));
        }
        for row in tx.open_table(NODES).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let (earned, jobs) = v.value();
            out.node_credits.0 += earned;
            out.nodes.push(NodeCredit {
                node: k.value().to_owned(),
                earned: Amount(earned),
                jobs,
            });
        }
        if out.charged != out.receipts_charged {
            out.problems.push(format!(
                "accounts were charged {} but receipts sum to {}",
                out.charged, out.receipts_charged
            ));
        }
        if out.node_credits != out.receipts_charged {
            out.problems.push(format!(
                "nodes were credited {} but receipts sum to {}",
                out.node_credits, out.receipts_charged
            ));
        }
        Ok(out)
    }
}

/// What the coordinator saw of a request besides its receipt.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestMeta {
    /// When the response ended (unix ms, the coordinator's clock).
    pub at_ms: u64,
    /// The model alias the caller asked for.
    pub model: String,
    /// The API endpoint (`chat` or `completions`).
    pub endpoint: String,
    /// Nodes tried, this one included (retries = attempts − 1).
    pub attempts: u32,
    /// Time to first token, as the node measured it (ms).
    pub ttft_ms: u32,
    /// Generation time after the first token (ms).
    pub decode_ms: u32,
}

/// A settled request, as usage lists it.
#[derive(Clone, Debug)]
pub struct RequestRow {
    /// The job.
    pub job: JobId,
    /// Base units charged.
    pub cost: u128,
    /// The node-signed receipt.
    pub receipt: Signed<Receipt>,
    /// What the coordinator saw (absent for requests settled before it was recorded).
    pub meta: Option<RequestMeta>,
    /// The receipts root of the posted settlement that carries it (`None`: not yet in a
    /// batch, or free).
    pub receipts_root: Option<[u8; 32]>,
    /// Its audit, if one was made.
    pub audit: Option<AuditRecord>,
}

/// Fills the request indexes of a ledger written before they existed, from the
/// receipts and the posted settlements, so old requests are listed and show their batch.
fn backfill_indexes(tx: &redb::WriteTransaction) -> Result<(), LedgerError> {
    let receipts = tx.open_table(RECEIPTS).map_err(db)?;
    let mut by_account = tx.open_table(ACCOUNT_JOBS).map_err(db)?;
    if by_account.is_empty().map_err(db)? && !receipts.is_empty().map_err(db)? {
        let mut by_node = tx.open_table(NODE_JOBS).map_err(db)?;
        for row in receipts.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let (account, _, bytes) = v.value();
            by_account.insert((account, k.value()), ()).map_err(db)?;
            if let Ok(r) = tessera_protocol::wire::decode::<Signed<Receipt>>(bytes, MAX_EVENT_FRAME)
            {
                let node = r.body.node.to_string();
                by_node
                    .insert((node.as_str(), r.body.finished_ms, k.value()), ())
                    .map_err(db)?;
            }
        }
    }
    let posted = tx.open_table(POSTED).map_err(db)?;
    let mut roots = tx.open_table(JOB_ROOTS).map_err(db)?;
    if roots.is_empty().map_err(db)? && !posted.is_empty().map_err(db)? {
        for row in posted.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let jobs: Vec<Unbatched> = serde_json::from_slice(v.value())
                .map_err(|e| LedgerError::BadReceipt(format!("posted row unreadable: {e}")))?;
            for j in jobs {
                roots.insert(&j.job.0, k.value()).map_err(db)?;
            }
        }
    }
    Ok(())
}

/// A settled job waiting for (or carried by) a rollup batch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unbatched {
    /// The job.
    pub job: JobId,
    /// The paying account.
    pub account: String,
    /// Base units charged.
    pub cost: u128,
    /// The node's L1 payout address.
    pub payout: [u8; 20],
    /// keccak256 of the stored signed receipt (a leaf of the settlement's receipts root).
    pub leaf: [u8; 32],
}

/// The rollup's side of the ledger: the link between API accounts and L1 addresses,
/// deposits credited once, and which receipts await a batch.
impl Ledger {
    /// Links `account` to the L1 address whose deposits credit it (and that signs its
    /// withdrawals). An address links to one account, an account to one address.
    pub fn link(&self, account: &str, address: &Address) -> Result<(), LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        {
            let accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            read_account(&accounts, account)?;
            let mut links = tx.open_table(LINKS).map_err(db)?;
            let mut linked = tx.open_table(LINKED).map_err(db)?;
            if let Some(other) = linked.get(&address.0).map_err(db)? {
                if other.value() != account {
                    return Err(LedgerError::BadReceipt(format!(
                        "address {address} is already linked to account {:?}",
                        other.value()
                    )));
                }
            }
            if let Some(old) = links.insert(account, &address.0).map_err(db)? {
                let old = *old.value();
                linked.remove(&old).map_err(db)?;
            }
            linked.insert(&address.0, account).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// The L1 address linked to `account`.
    pub fn address_of(&self, account: &str) -> Result<Option<Address>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let links = tx.open_table(LINKS).map_err(db)?;
        Ok(links.get(account).map_err(db)?.map(|v| Address(*v.value())))
    }

    /// The account linked to `address`.
    pub fn account_at(&self, address: &Address) -> Result<Option<String>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let linked = tx.open_table(LINKED).map_err(db)?;
        Ok(linked
            .get(&address.0)
            .map_err(db)?
            .map(|v| v.value().to_owned()))
    }

    /// Credits the account linked to `address` with L1 deposit `seq`, once: a deposit
    /// seen again (a restart re-reading L1) credits nothing. Returns the account credited.
    pub fn credit_deposit(
        &self,
        seq: u64,
        address: &Address,
        amount: Amount,
    ) -> Result<Option<String>, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let credited = {
            let mut seen = tx.open_table(DEPOSITS_SEEN).map_err(db)?;
            if seen.get(seq).map_err(db)?.is_some() {
                return Ok(None);
            }
            seen.insert(seq, ()).map_err(db)?;
            let account = tx
                .open_table(LINKED)
                .map_err(db)?
                .get(&address.0)
                .map_err(db)?
                .map(|v| v.value().to_owned());
            if let Some(account) = &account {
                let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
                let (credited, charged, reserved) = read_account(&accounts, account)?;
                let credited = credited
                    .checked_add(amount.0)
                    .ok_or_else(|| LedgerError::BadReceipt("balance overflows".into()))?;
                accounts
                    .insert(account.as_str(), (credited, charged, reserved))
                    .map_err(db)?;
            }
            account
        };
        tx.commit().map_err(db)?;
        Ok(credited)
    }

    /// Takes `amount` out of `account`'s available balance for an L2 withdrawal or stake
    /// (the L2 state moves it; the API must not spend it again).
    pub fn debit(&self, account: &str, amount: Amount) -> Result<Balance, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let after = {
            let mut accounts = tx.open_table(ACCOUNTS).map_err(db)?;
            let (credited, charged, reserved) = read_account(&accounts, account)?;
            let available = credited.saturating_sub(charged).saturating_sub(reserved);
            if amount.0 > available {
                return Err(LedgerError::InsufficientBalance {
                    needed: amount,
                    available: Amount(available),
                });
            }
            let row = (credited - amount.0, charged, reserved);
            accounts.insert(account, row).map_err(db)?;
            Balance::from_row(row)
        };
        tx.commit().map_err(db)?;
        Ok(after)
    }

    /// Settled jobs that no posted batch carries yet, in job order.
    pub fn unbatched(&self) -> Result<Vec<Unbatched>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(UNBATCHED).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let (account, cost, payout, leaf) = v.value();
            out.push(Unbatched {
                job: JobId(*k.value()),
                account: account.to_owned(),
                cost,
                payout: *payout,
                leaf: *leaf,
            });
        }
        Ok(out)
    }

    /// Records that a posted settlement with `receipts_root` carries `jobs`.
    pub fn mark_posted(
        &self,
        receipts_root: &[u8; 32],
        jobs: &[Unbatched],
    ) -> Result<(), LedgerError> {
        let rows = serde_json::to_vec(jobs).map_err(|e| LedgerError::BadReceipt(e.to_string()))?;
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut unbatched = tx.open_table(UNBATCHED).map_err(db)?;
            for j in jobs {
                unbatched.remove(&j.job.0).map_err(db)?;
            }
            tx.open_table(POSTED)
                .map_err(db)?
                .insert(receipts_root, rows.as_slice())
                .map_err(db)?;
            let mut roots = tx.open_table(JOB_ROOTS).map_err(db)?;
            for j in jobs {
                roots.insert(&j.job.0, receipts_root).map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Puts the jobs of posted settlements that L1 no longer holds (a reverted batch)
    /// back among the unbatched. `live` holds the receipts roots of every settlement in
    /// the batches L1 still has. Returns how many jobs came back.
    pub fn unpost_except(
        &self,
        live: &std::collections::HashSet<[u8; 32]>,
    ) -> Result<usize, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut back = 0;
        {
            let mut posted = tx.open_table(POSTED).map_err(db)?;
            let mut gone = Vec::new();
            for row in posted.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if !live.contains(k.value()) {
                    let jobs: Vec<Unbatched> = serde_json::from_slice(v.value()).map_err(|e| {
                        LedgerError::BadReceipt(format!("posted row unreadable: {e}"))
                    })?;
                    gone.push((*k.value(), jobs));
                }
            }
            let mut unbatched = tx.open_table(UNBATCHED).map_err(db)?;
            let mut roots = tx.open_table(JOB_ROOTS).map_err(db)?;
            for (root, jobs) in gone {
                posted.remove(&root).map_err(db)?;
                for j in jobs {
                    roots.remove(&j.job.0).map_err(db)?;
                    unbatched
                        .insert(&j.job.0, (j.account.as_str(), j.cost, &j.payout, &j.leaf))
                        .map_err(db)?;
                    back += 1;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(back)
    }
}

/// An account's (credited, charged, reserved), or `UnknownAccount`.
/// Audits: each node's standing, every audit, and the disputes failed ones opened.
impl Ledger {
    fn standing_in(
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        node: &str,
    ) -> Result<NodeRecord, LedgerError> {
        Ok(match table.get(node).map_err(db)? {
            Some(v) => serde_json::from_slice(v.value())
                .map_err(|e| LedgerError::AuditRecord(format!("standing unreadable: {e}")))?,
            None => NodeRecord::default(),
        })
    }

    /// Stores an audit (and the dispute a failed one opens) and updates the node's
    /// standing, in one transaction. Returns the new standing.
    pub fn record_audit(
        &self,
        node: &str,
        audit: &AuditRecord,
        dispute: Option<&Dispute>,
    ) -> Result<NodeRecord, LedgerError> {
        let job = parse_job_hex(&audit.job)?;
        let tx = self.db.begin_write().map_err(db)?;
        let record = {
            let mut t = tx.open_table(STANDINGS).map_err(db)?;
            let mut r = Self::standing_in(&t, node)?;
            match audit.result.as_str() {
                "passed" => r.passed += 1,
                "failed" => r.failed += 1,
                _ => r.missed += 1,
            }
            r.last_audit_ms = Some(audit.at_ms);
            tx.open_table(AUDITS)
                .map_err(db)?
                .insert(&job, json(audit)?.as_slice())
                .map_err(db)?;
            if let Some(d) = dispute {
                r.open_disputes += u32::from(d.open);
                r.slashed = r.slashed.checked_add(d.slash.amount).unwrap_or(r.slashed);
                tx.open_table(DISPUTES)
                    .map_err(db)?
                    .insert(&job, json(d)?.as_slice())
                    .map_err(db)?;
            }
            t.insert(node, json(&r)?.as_slice()).map_err(db)?;
            r
        };
        tx.commit().map_err(db)?;
        Ok(record)
    }

    /// Records where the slash of the dispute over `job` stands.
    pub fn set_slash_status(&self, job: &str, status: SlashStatus) -> Result<(), LedgerError> {
        self.update_dispute(job, |d, _| {
            d.slash.status = status;
            Ok(())
        })
        .map(|_| ())
    }

    /// Closes the dispute over `job` (an operator's decision, e.g. after the node fixed its
    /// setup): the node's open disputes drop by one, so it is routed again once none is
    /// left. Its slash and audit history stay. Returns the dispute as closed.
    pub fn close_dispute(&self, job: &str) -> Result<Dispute, LedgerError> {
        self.update_dispute(job, |d, tx| {
            if !d.open {
                return Err(LedgerError::Dispute(format!(
                    "the dispute over job {job} is already closed"
                )));
            }
            d.open = false;
            let mut standings = tx.open_table(STANDINGS).map_err(db)?;
            let mut r = Self::standing_in(&standings, &d.audit.node)?;
            r.open_disputes = r.open_disputes.saturating_sub(1);
            standings
                .insert(d.audit.node.as_str(), json(&r)?.as_slice())
                .map_err(db)?;
            Ok(())
        })
    }

    /// Reads the dispute over `job`, lets `change` edit it (and write other tables in the
    /// same transaction), and stores it back; all or nothing.
    fn update_dispute(
        &self,
        job: &str,
        change: impl FnOnce(&mut Dispute, &redb::WriteTransaction) -> Result<(), LedgerError>,
    ) -> Result<Dispute, LedgerError> {
        let key = parse_job_hex(job)?;
        let tx = self.db.begin_write().map_err(db)?;
        let dispute = {
            let mut t = tx.open_table(DISPUTES).map_err(db)?;
            let mut d: Dispute = match t.get(&key).map_err(db)? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|e| LedgerError::AuditRecord(format!("dispute unreadable: {e}")))?,
                None => {
                    return Err(LedgerError::Dispute(format!(
                        "no dispute over job {job}: `tessera disputes list` shows them"
                    )))
                }
            };
            change(&mut d, &tx)?;
            t.insert(&key, json(&d)?.as_slice()).map_err(db)?;
            d
        };
        tx.commit().map_err(db)?;
        Ok(dispute)
    }

    /// Every node's standing.
    pub fn node_records(&self) -> Result<Vec<(String, NodeRecord)>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(STANDINGS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, _) = row.map_err(db)?;
            out.push((k.value().to_owned(), Self::standing_in(&t, k.value())?));
        }
        Ok(out)
    }

    /// Every audit, oldest first.
    pub fn audits(&self) -> Result<Vec<AuditRecord>, LedgerError> {
        let mut v: Vec<AuditRecord> = self.json_rows(AUDITS)?;
        v.sort_by_key(|a| a.at_ms);
        Ok(v)
    }

    /// An account's settled requests, newest first.
    pub fn requests(&self, account: &str) -> Result<Vec<RequestRow>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let index = tx.open_table(ACCOUNT_JOBS).map_err(db)?;
        let mut out = Vec::new();
        let lo: (&str, &[u8; 16]) = (account, &[0; 16]);
        let hi: (&str, &[u8; 16]) = (account, &[0xff; 16]);
        for row in index.range(lo..=hi).map_err(db)? {
            let (k, _) = row.map_err(db)?;
            let job = JobId(*k.value().1);
            if let Some(r) = self.request_in(&tx, job)? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse((r.receipt.body.finished_ms, r.job.0)));
        Ok(out)
    }

    /// The newest `limit` settled requests a node served.
    pub fn node_requests(
        &self,
        node: &tessera_protocol::PeerId,
        limit: usize,
    ) -> Result<Vec<RequestRow>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let index = tx.open_table(NODE_JOBS).map_err(db)?;
        let node = node.to_string();
        let lo: (&str, u64, &[u8; 16]) = (node.as_str(), 0, &[0; 16]);
        let hi: (&str, u64, &[u8; 16]) = (node.as_str(), u64::MAX, &[0xff; 16]);
        let mut out = Vec::new();
        for row in index.range(lo..=hi).map_err(db)?.rev().take(limit) {
            let (k, _) = row.map_err(db)?;
            out.extend(self.request_in(&tx, JobId(*k.value().2))?);
        }
        Ok(out)
    }

    /// One settled request.
    pub fn request(&self, job: JobId) -> Result<Option<RequestRow>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        self.request_in(&tx, job)
    }

    fn request_in(
        &self,
        tx: &redb::ReadTransaction,
        job: JobId,
    ) -> Result<Option<RequestRow>, LedgerError> {
        let receipts = tx.open_table(RECEIPTS).map_err(db)?;
        let Some(row) = receipts.get(&job.0).map_err(db)? else {
            return Ok(None);
        };
        let (_, cost, bytes) = row.value();
        let receipt = tessera_protocol::wire::decode(bytes, MAX_EVENT_FRAME)
            .map_err(|e| LedgerError::BadReceipt(format!("stored receipt unreadable: {e}")))?;
        let meta = tx
            .open_table(REQUESTS)
            .map_err(db)?
            .get(&job.0)
            .map_err(db)?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        let receipts_root = tx
            .open_table(JOB_ROOTS)
            .map_err(db)?
            .get(&job.0)
            .map_err(db)?
            .map(|v| *v.value());
        let audit = tx
            .open_table(AUDITS)
            .map_err(db)?
            .get(&job.0)
            .map_err(db)?
            .and_then(|v| serde_json::from_slice(v.value()).ok());
        Ok(Some(RequestRow {
            job,
            cost,
            receipt,
            meta,
            receipts_root,
            audit,
        }))
    }

    /// The leaves of a posted settlement's receipts, in the order of its receipts root.
    pub fn posted_jobs(&self, receipts_root: &[u8; 32]) -> Result<Vec<Unbatched>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let posted = tx.open_table(POSTED).map_err(db)?;
        let Some(v) = posted.get(receipts_root).map_err(db)? else {
            return Ok(Vec::new());
        };
        serde_json::from_slice(v.value())
            .map_err(|e| LedgerError::BadReceipt(format!("posted row unreadable: {e}")))
    }

    /// Every dispute, oldest first.
    pub fn disputes(&self) -> Result<Vec<Dispute>, LedgerError> {
        let mut v: Vec<Dispute> = self.json_rows(DISPUTES)?;
        v.sort_by_key(|d| d.audit.at_ms);
        Ok(v)
    }

    fn json_rows<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8; 16], &[u8]>,
    ) -> Result<Vec<T>, LedgerError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| LedgerError::AuditRecord(format!("unreadable: {e}")))?,
            );
        }
        Ok(out)
    }
}

/// JSON encoding of stored audit rows.
fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, LedgerError> {
    serde_json::to_vec(v).map_err(|e| LedgerError::AuditRecord(e.to_string()))
}

fn parse_job_hex(hex_id: &str) -> Result<[u8; 16], LedgerError> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_id, &mut out)
        .map_err(|_| LedgerError::Dispute(format!("job id {hex_id:?} is not 32 hex digits")))?;
    Ok(out)
}

fn read_account(
    accounts: &impl ReadableTable<&'static str, (u128, u128, u128)>,
    account: &str,
) -> Result<(u128, u128, u128), LedgerError> {
    Ok(accounts
        .get(account)
        .map_err(db)?
        .ok_or_else(|| LedgerError::UnknownAccount(account.to_owned()))?
        .value())
}

/// Removes a job's reservation, returning (account, amount held).
fn take_reservation(
    reservations: &mut redb::Table<&'static [u8; 16], (&'static str, u128)>,
    job: JobId,
) -> Result<(String, u128), LedgerError> {
    let row = reservations
        .remove(&job.0)
        .map_err(db)?
        .ok_or(LedgerError::NoReservation(job))?;
    let (account, held) = row.value();
    Ok((account.to_owned(), held))
}

pub(crate) fn random_bytes() -> [u8; 32] {
    // A fresh ed25519 secret is 32 bytes from the OS generator: reuse it rather than add
    // a second source of randomness.
    let key = tessera_protocol::Keypair::generate_ed25519();
    *blake3::Hasher::new_derive_key("tessera api key secret v1")
        .update(&key.to_protobuf_encoding().unwrap_or_default())
        .finalize()
        .as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::{
        FinishReason, Keypair, ModuleId, Price, Quantization, SamplingParams, TranscriptCommitment,
        Usage, WeightsHash,
    };

    const PAYOUT: Address = Address([9; 20]);

    #[test]
    fn deposits_credit_linked_accounts_once_and_receipts_wait_for_a_batch_until_posted() {
        let dir = tempfile::tempdir().expect("dir");
        let ledger = Ledger::open(&dir.path().join("l.redb")).expect("open");
        ledger.create_account("alice").expect("create");
        ledger.create_account("bob").expect("create");
        let addr = Address([1; 20]);
        ledger.link("alice", &addr).expect("link");
        assert!(
            ledger.link("bob", &addr).is_err(),
            "one account per address"
        );
        assert_eq!(ledger.address_of("alice").expect("read"), Some(addr));
        assert_eq!(
            ledger
                .credit_deposit(0, &addr, Amount(1_000))
                .expect("credit"),
            Some("alice".into())
        );
        assert_eq!(
            ledger
                .credit_deposit(0, &addr, Amount(1_000))
                .expect("again"),
            None
        );
        assert_eq!(
            ledger
                .credit_deposit(1, &Address([2; 20]), Amount(5))
                .expect("unlinked"),
            None
        );
        assert_eq!(
            ledger.balance("alice").expect("balance").balance,
            Amount(1_000)
        );

        let (a, b) = (JobId([1; 16]), JobId([2; 16]));
        for job in [a, b] {
            ledger.reserve("alice", job, Amount(100)).expect("reserve");
            ledger
                .settle(job, &receipt(job, 40), &PAYOUT)
                .expect("settle");
        }
        let waiting = ledger.unbatched().expect("unbatched");
        assert_eq!(
            waiting.iter().map(|u| u.job).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert!(waiting
            .iter()
            .all(|u| u.cost == 40 && u.payout == PAYOUT.0 && u.account == "alice"));
        ledger.mark_posted(&[7; 32], &waiting).expect("posted");
        assert!(ledger.unbatched().expect("unbatched").is_empty());
        // The batch is reverted on L1: its jobs come back, once.
        let live = std::collections::HashSet::from([[8u8; 32]]);
        assert_eq!(ledger.unpost_except(&live).expect("unpost"), 2);
        assert_eq!(ledger.unpost_except(&live).expect("again"), 0);
        assert_eq!(ledger.unbatched().expect("unbatched").len(), 2);

        assert!(matches!(
            ledger.debit("alice", Amount(921)),
            Err(LedgerError::InsufficientBalance { .. })
        ));
        assert_eq!(
            ledger.debit("alice", Amount(920)).expect("debit").balance,
            Amount(0)
        );
        assert!(ledger.check().expect("check").problems.is_empty());
    }

    fn receipt(job: JobId, cost: u128) -> Signed<Receipt> {
        let node = Keypair::generate_ed25519();
        let body = Receipt {
            job_id: job,
            node: node.public().to_peer_id(),
            coordinator: Keypair::generate_ed25519().public().to_peer_id(),
            payer: "alice".into(),
            module: ModuleId::new(
                "llama",
                Quantization::from_gguf_file_type(3),
                8192,
                WeightsHash([1; 32]),
            )
            .expect("module"),
            input_hash: [2; 32],
            sampling: SamplingParams::greedy(),
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
            },
            finish_reason: FinishReason::Stop,
            price: Price::default(),
            cost: Amount(cost),
            commitment: TranscriptCommitment([3; 32]),
            started_ms: 1,
            finished_ms: 2,
            verdict: None,
        };
        Signed::sign(body, &node).expect("sign")
    }

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).expect("open");
        (dir, ledger)
    }

    #[test]
    fn keys_are_stored_hashed_and_authenticate_their_account() {
        let (dir, ledger) = ledger();
        ledger.create_account("alice").expect("account");
        let key = ledger.create_key("alice").expect("key");
        assert!(key.expose().starts_with("tsk_") && key.expose().len() == 68);
        assert_eq!(ledger.authenticate(key.expose()).expect("auth"), "alice");
        assert!(matches!(
            ledger.authenticate("tsk_nope"),
            Err(LedgerError::BadKey)
        ));
        assert!(matches!(
            ledger.create_key("bob"),
            Err(LedgerError::UnknownAccount(_))
        ));
        assert!(matches!(
            ledger.create_account("alice"),
            Err(LedgerError::AccountExists(_))
        ));
        assert!(matches!(
            ledger.create_account("no spaces"),
            Err(LedgerError::BadAccountId(_))
        ));
        assert_eq!(
            format!("{key:?}"),
            "ApiKey(..)",
            "the secret never reaches logs"
        );
        drop(ledger);
        let file = std::fs::read(dir.path().join("ledger.redb")).expect("read db");
        let secret = key.expose().as_bytes();
        assert!(
            !file.windows(secret.len()).any(|w| w == secret),
            "the key itself is not on disk"
        );
    }

    #[test]
    fn reserve_settle_and_release_move_money_exactly_once() {
        let (_dir, ledger) = ledger();
        ledger.create_account("alice").expect("account");
        ledger.credit("alice", Amount(1_000)).expect("credit");
        let (a, b, c) = (JobId([1; 16]), JobId([2; 16]), JobId([3; 16]));

        ledger.reserve("alice", a, Amount(600)).expect("reserve a");
        let err = ledger.reserve("alice", b, Amount(500)).unwrap_err();
        assert!(
            matches!(
                err,
                LedgerError::InsufficientBalance {
                    needed: Amount(500),
                    available: Amount(400)
                }
            ),
            "{err}"
        );
        assert!(matches!(
            ledger.reserve("alice", a, Amount(1)),
            Err(LedgerError::DuplicateJob(_))
        ));
        assert_eq!(
            ledger.balance("alice").expect("balance").available(),
            Amount(400)
        );

        // Charged what the receipt says, the rest of the hold released.
        let s = ledger.settle(a, &receipt(a, 250), &PAYOUT).expect("settle");
        assert_eq!((s.charged, s.released), (Amount(250), Amount(350)));
        let bal = ledger.balance("alice").expect("balance");
        assert_eq!((bal.balance, bal.reserved), (Amount(750), Amount(0)));
        // Never twice, and a settled job cannot be reserved again.
        assert!(matches!(
            ledger.settle(a, &receipt(a, 250), &PAYOUT),
            Err(LedgerError::AlreadySettled(_))
        ));
        assert!(matches!(
            ledger.reserve("alice", a, Amount(1)),
            Err(LedgerError::DuplicateJob(_))
        ));
        let (account, charged, stored) = ledger.receipt(a).expect("read").expect("stored");
        assert_eq!((account.as_str(), charged), ("alice", Amount(250)));
        assert!(stored.verify().is_ok(), "the stored receipt still verifies");

        // A receipt asking more than was held is capped at the hold.
        ledger.reserve("alice", b, Amount(100)).expect("reserve b");
        let s = ledger
            .settle(b, &receipt(b, 5_000), &PAYOUT)
            .expect("settle");
        assert_eq!((s.charged, s.released), (Amount(100), Amount(0)));

        // A failed job gives its hold back and charges nothing.
        ledger.reserve("alice", c, Amount(300)).expect("reserve c");
        assert_eq!(ledger.release(c).expect("release"), Amount(300));
        assert!(matches!(
            ledger.release(c),
            Err(LedgerError::NoReservation(_))
        ));
        assert!(matches!(
            ledger.settle(c, &receipt(c, 1), &PAYOUT),
            Err(LedgerError::NoReservation(_))
        ));
        assert!(matches!(
            ledger.settle(c, &receipt(a, 1), &PAYOUT),
            Err(LedgerError::BadReceipt(_))
        ));
        let bal = ledger.balance("alice").expect("balance");
        assert_eq!((bal.balance, bal.reserved), (Amount(650), Amount(0)));
        assert_eq!((bal.credited, bal.charged), (Amount(1_000), Amount(350)));

        // The books balance: debits = receipts = node credits.
        ledger
            .reserve("alice", c, Amount(10))
            .expect("reserve again");
        let check = ledger.check().expect("check");
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.charged, Amount(350));
        assert_eq!(check.receipts_charged, Amount(350));
        assert_eq!(check.node_credits, Amount(350));
        assert_eq!((check.receipts, check.open_reservations), (2, 1));
        assert_eq!(check.reserved, Amount(10));
        assert_eq!(check.nodes.len(), 2, "each test receipt has its own node");
    }

    #[test]
    fn everything_committed_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.redb");
        let key = {
            let ledger = Ledger::open(&path).expect("open");
            ledger.create_account("alice").expect("account");
            ledger.credit("alice", Amount(500)).expect("credit");
            ledger
                .reserve("alice", JobId([7; 16]), Amount(200))
                .expect("reserve");
            ledger
                .reserve("alice", JobId([8; 16]), Amount(100))
                .expect("reserve");
            ledger
                .settle(JobId([8; 16]), &receipt(JobId([8; 16]), 40), &PAYOUT)
                .expect("settle");
            ledger.create_key("alice").expect("key")
        };
        let ledger = Ledger::open(&path).expect("reopen");
        let bal = ledger.balance("alice").expect("balance");
        assert_eq!((bal.balance, bal.reserved), (Amount(460), Amount(200)));
        assert_eq!(ledger.authenticate(key.expose()).expect("auth"), "alice");
        assert!(ledger.receipt(JobId([8; 16])).expect("read").is_some());
        assert!(ledger.check().expect("check").problems.is_empty());
        // A restart releases holds whose jobs died with the old process.
        assert_eq!(
            ledger.recover().expect("recover"),
            (1, Amount(200)),
            "the open reservation was kept until recovery"
        );
        let bal = ledger.balance("alice").expect("balance");
        assert_eq!((bal.balance, bal.reserved), (Amount(460), Amount(0)));
        assert!(matches!(
            ledger.release(JobId([7; 16])),
            Err(LedgerError::NoReservation(_))
        ));
        let check = ledger.check().expect("check");
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.receipts_charged, Amount(40));
    }
}
