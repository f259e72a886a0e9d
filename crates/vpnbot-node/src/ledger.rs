//! The ledger: the agent's durable record of the users it manages (a `redb` file), written
//! before the core is told. It is the desired state: after a core restart (the core forgets
//! every user added at run time) or an agent crash between "ledger written" and "core told",
//! the agent re-applies it (see [`crate::agent`]).
//!
//! Tables:
//! - `users`: UUID → email exactly as given (the ownership marker is returned byte for byte);
//! - `emails`: lower-cased email → UUID, so emails stay unique ignoring ASCII case (V2Ray matches
//!   emails case-insensitively: `DYN@test` is `dyn@test`);
//! - `tombstones`: email → UUID of users whose removal from the core is not yet confirmed.
//!
//! Every call is synchronous (a commit waits for the disk); callers run them on the blocking
//! pool.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use uuid::Uuid;

const USERS: TableDefinition<u128, &str> = TableDefinition::new("users");
const EMAILS: TableDefinition<&str, u128> = TableDefinition::new("emails");
const TOMBSTONES: TableDefinition<&str, u128> = TableDefinition::new("tombstones");

/// A ledger failure (I/O, corruption). Its text names the operation, never a user.
#[derive(Debug, thiserror::Error)]
#[error("ledger {op}: {source}")]
pub struct LedgerError {
    op: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    op: &'static str,
) -> impl FnOnce(E) -> LedgerError {
    move |e| LedgerError {
        op,
        source: e.into(),
    }
}

/// The email key of the uniqueness index.
pub fn email_key(email: &str) -> String {
    email.to_ascii_lowercase()
}

/// What [`Ledger::put`] found before writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The UUID was absent; it is now recorded.
    Inserted,
    /// The UUID was present with exactly this email; nothing written.
    Same,
    /// The UUID was present with `old`; the new email is recorded and `old` tombstoned.
    Replaced {
        /// The email the core still knows the user by.
        old: String,
    },
    /// The email (ignoring ASCII case) belongs to another UUID; nothing written.
    EmailTaken,
}

/// The ledger. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Ledger {
    db: Database,
}

impl Ledger {
    /// Opens (or creates) the ledger file at `path`.
    ///
    /// # Errors
    /// The file cannot be created, is locked by another process, or is not a ledger.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let db = Database::create(path).map_err(err("open"))?;
        let tx = db.begin_write().map_err(err("open"))?;
        tx.open_table(USERS).map_err(err("open"))?;
        tx.open_table(EMAILS).map_err(err("open"))?;
        tx.open_table(TOMBSTONES).map_err(err("open"))?;
        tx.commit().map_err(err("open"))?;
        Ok(Ledger { db })
    }

    /// The email of `uuid`, if recorded.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn get(&self, uuid: Uuid) -> Result<Option<String>, LedgerError> {
        let tx = self.db.begin_read().map_err(err("get"))?;
        let t = tx.open_table(USERS).map_err(err("get"))?;
        Ok(t.get(uuid.as_u128())
            .map_err(err("get"))?
            .map(|v| v.value().to_owned()))
    }

    /// Records `uuid` with `email` (see [`PutOutcome`]); `only_if_present` makes it an update
    /// that writes nothing for an absent UUID (returns `None`).
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn put(
        &self,
        uuid: Uuid,
        email: &str,
        only_if_present: bool,
    ) -> Result<Option<PutOutcome>, LedgerError> {
        let key = email_key(email);
        let tx = self.db.begin_write().map_err(err("put"))?;
        let outcome = {
            let mut users = tx.open_table(USERS).map_err(err("put"))?;
            let mut emails = tx.open_table(EMAILS).map_err(err("put"))?;
            let mut tombs = tx.open_table(TOMBSTONES).map_err(err("put"))?;
            let present = users
                .get(uuid.as_u128())
                .map_err(err("put"))?
                .map(|v| v.value().to_owned());
            let owner = emails
                .get(key.as_str())
                .map_err(err("put"))?
                .map(|v| v.value());
            match present {
                None if only_if_present => return Ok(None),
                Some(ref e) if e == email => PutOutcome::Same,
                _ if owner.is_some_and(|o| o != uuid.as_u128()) => PutOutcome::EmailTaken,
                present => {
                    users.insert(uuid.as_u128(), email).map_err(err("put"))?;
                    emails
                        .insert(key.as_str(), uuid.as_u128())
                        .map_err(err("put"))?;
                    // A pending removal of this very email is superseded by the new user.
                    tombs.remove(email).map_err(err("put"))?;
                    match present {
                        None => PutOutcome::Inserted,
                        Some(old) => {
                            if email_key(&old) != key {
                                emails
                                    .remove(email_key(&old).as_str())
                                    .map_err(err("put"))?;
                            }
                            tombs
                                .insert(old.as_str(), uuid.as_u128())
                                .map_err(err("put"))?;
                            PutOutcome::Replaced { old }
                        }
                    }
                }
            }
        };
        if matches!(outcome, PutOutcome::Same | PutOutcome::EmailTaken) {
            tx.abort().map_err(err("put"))?;
        } else {
            tx.commit().map_err(err("put"))?;
        }
        Ok(Some(outcome))
    }

    /// Removes `uuid`; with `tombstone` its email is kept in `tombstones` until
    /// [`Ledger::clear_tombstone`] confirms the core removed it too. Returns the email it had.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn remove(&self, uuid: Uuid, tombstone: bool) -> Result<Option<String>, LedgerError> {
        let tx = self.db.begin_write().map_err(err("remove"))?;
        let old = {
            let mut users = tx.open_table(USERS).map_err(err("remove"))?;
            let mut emails = tx.open_table(EMAILS).map_err(err("remove"))?;
            let mut tombs = tx.open_table(TOMBSTONES).map_err(err("remove"))?;
            let old = users
                .remove(uuid.as_u128())
                .map_err(err("remove"))?
                .map(|v| v.value().to_owned());
            if let Some(ref e) = old {
                emails
                    .remove(email_key(e).as_str())
                    .map_err(err("remove"))?;
                if tombstone {
                    tombs
                        .insert(e.as_str(), uuid.as_u128())
                        .map_err(err("remove"))?;
                }
            }
            old
        };
        tx.commit().map_err(err("remove"))?;
        Ok(old)
    }

    /// Records many users in one transaction (a bulk import; one commit instead of one per
    /// user). Users whose UUID or email is already recorded are skipped; returns how many were
    /// written.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn import(&self, users: &[(Uuid, String)]) -> Result<u64, LedgerError> {
        let tx = self.db.begin_write().map_err(err("import"))?;
        let mut n = 0;
        {
            let mut t = tx.open_table(USERS).map_err(err("import"))?;
            let mut emails = tx.open_table(EMAILS).map_err(err("import"))?;
            for (id, email) in users {
                let key = email_key(email);
                if t.get(id.as_u128()).map_err(err("import"))?.is_some()
                    || emails.get(key.as_str()).map_err(err("import"))?.is_some()
                {
                    continue;
                }
                t.insert(id.as_u128(), email.as_str())
                    .map_err(err("import"))?;
                emails
                    .insert(key.as_str(), id.as_u128())
                    .map_err(err("import"))?;
                n += 1;
            }
        }
        tx.commit().map_err(err("import"))?;
        Ok(n)
    }

    /// Forgets the pending removal of `email`.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn clear_tombstone(&self, email: &str) -> Result<(), LedgerError> {
        let tx = self.db.begin_write().map_err(err("clear_tombstone"))?;
        tx.open_table(TOMBSTONES)
            .map_err(err("clear_tombstone"))?
            .remove(email)
            .map_err(err("clear_tombstone"))?;
        tx.commit().map_err(err("clear_tombstone"))
    }

    /// Emails whose removal from the core is pending.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn tombstones(&self) -> Result<Vec<String>, LedgerError> {
        let tx = self.db.begin_read().map_err(err("tombstones"))?;
        let t = tx.open_table(TOMBSTONES).map_err(err("tombstones"))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err("tombstones"))? {
            let (k, _) = row.map_err(err("tombstones"))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    /// Number of users.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn len(&self) -> Result<u64, LedgerError> {
        let tx = self.db.begin_read().map_err(err("len"))?;
        let t = tx.open_table(USERS).map_err(err("len"))?;
        t.len().map_err(err("len"))
    }

    /// Whether the ledger has no users.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// Calls `f` for every user in UUID order, from one consistent snapshot, without collecting
    /// them; stops early when `f` returns `false`.
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn for_each(&self, mut f: impl FnMut(Uuid, &str) -> bool) -> Result<(), LedgerError> {
        let tx = self.db.begin_read().map_err(err("list"))?;
        let t = tx.open_table(USERS).map_err(err("list"))?;
        for row in t.iter().map_err(err("list"))? {
            let (k, v) = row.map_err(err("list"))?;
            if !f(Uuid::from_u128(k.value()), v.value()) {
                break;
            }
        }
        Ok(())
    }

    /// Every user (used by resync, which needs them all anyway).
    ///
    /// # Errors
    /// I/O or corruption.
    pub fn all(&self) -> Result<Vec<(Uuid, String)>, LedgerError> {
        let mut out = Vec::new();
        self.for_each(|id, e| {
            out.push((id, e.to_owned()));
            true
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_remove_and_uniqueness() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.redb")).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(l.put(a, "vb.A", false).unwrap(), Some(PutOutcome::Inserted));
        assert_eq!(l.put(a, "vb.A", false).unwrap(), Some(PutOutcome::Same));
        assert_eq!(
            l.put(b, "VB.a", false).unwrap(),
            Some(PutOutcome::EmailTaken),
            "emails are unique ignoring ASCII case"
        );
        assert_eq!(
            l.put(b, "x", true).unwrap(),
            None,
            "update of an absent uuid"
        );
        assert_eq!(
            l.put(a, "vb.B", false).unwrap(),
            Some(PutOutcome::Replaced { old: "vb.A".into() })
        );
        assert_eq!(l.tombstones().unwrap(), vec!["vb.A".to_owned()]);
        assert_eq!(l.put(b, "vb.A", false).unwrap(), Some(PutOutcome::Inserted));
        assert!(
            l.tombstones().unwrap().is_empty(),
            "re-added email supersedes"
        );
        assert_eq!(l.remove(a, true).unwrap().as_deref(), Some("vb.B"));
        assert_eq!(l.remove(a, true).unwrap(), None);
        assert_eq!(l.tombstones().unwrap(), vec!["vb.B".to_owned()]);
        l.clear_tombstone("vb.B").unwrap();
        assert_eq!(l.len().unwrap(), 1);
        drop(l);
        // Durable across reopen.
        let l = Ledger::open(&dir.path().join("l.redb")).unwrap();
        assert_eq!(l.all().unwrap(), vec![(b, "vb.A".to_owned())]);
    }
}
