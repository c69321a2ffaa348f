//! `tessera accounts …` and `tessera keys …`: the operator's admin commands on the
//! coordinator's ledger (run while the coordinator is stopped: the ledger has one owner).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tessera_coordinator::Ledger;
use tessera_protocol::Amount;

#[derive(Args, Debug)]
pub struct LedgerArg {
    /// The ledger file [default: $TESSERA_HOME/coordinator/ledger.redb].
    #[arg(long, env = "TESSERA_LEDGER", global = true)]
    ledger: Option<PathBuf>,
}

impl LedgerArg {
    fn open(&self, home: &Path) -> Result<Ledger> {
        let path = self
            .ledger
            .clone()
            .unwrap_or_else(|| home.join("coordinator").join("ledger.redb"));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(Ledger::open(&path)?)
    }
}

#[derive(Subcommand, Debug)]
pub enum AccountsCommand {
    /// Create an empty account.
    Create {
        /// Account id: 1-64 letters, digits, '-', '_' or '.'.
        account: String,
    },
    /// Add funds to an account, in base units (deposits through the rollup replace this).
    Credit {
        /// The account.
        account: String,
        /// Amount in base units.
        amount: Amount,
    },
    /// Print an account's balance, reservations and available funds as JSON.
    Show {
        /// The account.
        account: String,
    },
    /// Total the books and check they balance (debits = receipts = node credits); prints
    /// JSON and fails when an invariant does not hold.
    Check,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Issue an API key for an account; it is printed once and stored only as a hash.
    Create {
        /// The account.
        account: String,
    },
}

fn show(ledger: &Ledger, account: &str) -> Result<()> {
    println!("{}", ledger.balance(account)?.to_json(account));
    Ok(())
}

/// Runs an accounts subcommand.
pub fn accounts(home: &Path, ledger: &LedgerArg, cmd: AccountsCommand) -> Result<()> {
    let l = ledger.open(home)?;
    match cmd {
        AccountsCommand::Create { account } => {
            l.create_account(&account)?;
            show(&l, &account)
        }
        AccountsCommand::Credit { account, amount } => {
            l.credit(&account, amount)?;
            show(&l, &account)
        }
        AccountsCommand::Show { account } => show(&l, &account),
        AccountsCommand::Check => {
            let check = l.check()?;
            println!("{}", serde_json::to_string_pretty(&check)?);
            if !check.problems.is_empty() {
                anyhow::bail!("the books do not balance: {}", check.problems.join("; "));
            }
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DisputesCommand {
    /// Print every dispute (node, auditor, verdict, slash, open or not) as JSON.
    List,
    /// Close a dispute: the node is routed again once it has none open (its slash and
    /// audit history stay). Run while the coordinator is stopped.
    Close {
        /// The audited job's id (`job` in the list).
        job: String,
    },
}

/// Runs a disputes subcommand.
pub fn disputes(home: &Path, ledger: &LedgerArg, cmd: DisputesCommand) -> Result<()> {
    let l = ledger.open(home)?;
    let summary = |d: &tessera_coordinator::Dispute| {
        serde_json::json!({
            "job": d.audit.job,
            "node": d.audit.node,
            "auditor": d.audit.auditor,
            "module": d.audit.module,
            "detail": d.audit.detail,
            "records": d.claimed.len(),
            "slash": d.slash,
            "open": d.open,
            "at_ms": d.audit.at_ms,
        })
    };
    match cmd {
        DisputesCommand::List => {
            let all: Vec<_> = l.disputes()?.iter().map(summary).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        DisputesCommand::Close { job } => {
            let d = l.close_dispute(&job)?;
            println!("{}", summary(&d));
        }
    }
    Ok(())
}

/// Runs a keys subcommand.
pub fn keys(home: &Path, ledger: &LedgerArg, cmd: KeysCommand) -> Result<()> {
    let l = ledger.open(home)?;
    match cmd {
        KeysCommand::Create { account } => {
            let key = l.create_key(&account)?;
            println!("{}", key.expose());
            eprintln!("API key for {account}: shown once, stored only as a hash");
            Ok(())
        }
    }
}
