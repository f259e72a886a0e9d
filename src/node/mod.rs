//! Client of the node API: the HTTP API each VPN node runs in front of its Xray core.
//!
//! Every call is bounded (connect, headers, body-idle and total deadlines, a body cap),
//! protected (jittered retries for calls safe to repeat, a per-node circuit breaker) and
//! visible (a span per call with child spans per phase, Prometheus metrics, and a registry of
//! in-flight calls readable from any thread). The contract is `openapi/node-api.json`.
//!
//! The predecessor froze for 11 minutes after `GET .../list-users 200 OK`: headers arrived,
//! the body never did, and a per-read timeout never fired. Here the body phase has its own idle
//! timeout and the total deadline covers resolution, connect, headers, body and decoding.

pub mod bench;
mod breaker;
mod client;
mod error;
mod inflight;
mod metrics;
mod settings;
pub mod wire;

pub use breaker::BreakerState;
pub use client::{BlockingResolve, NodeClient};
pub use error::{DecodeError, NodeError};
pub use inflight::{InflightCall, InflightCalls, Phase};
pub use metrics::NodeApiMetrics;
pub use settings::*;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// One operation of the node API contract. Its [`Operation::as_str`] is the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `GET /v1/health`.
    Health,
    /// `GET /v1/users`: every user on the node's inbound.
    ListUsers,
    /// `POST /v1/users`: adds a user; adding an identical present user succeeds.
    AddUser,
    /// `PUT /v1/users/{uuid}`: replaces the email/tag of a present user.
    UpdateUser,
    /// `DELETE /v1/users/{uuid}`: removing an absent user succeeds.
    RemoveUser,
}

impl Operation {
    /// Every operation, in contract order.
    pub const ALL: [Operation; 5] = [
        Operation::Health,
        Operation::ListUsers,
        Operation::AddUser,
        Operation::UpdateUser,
        Operation::RemoveUser,
    ];

    /// Label value (`snake_case`), bounded.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Health => "health",
            Operation::ListUsers => "list_users",
            Operation::AddUser => "add_user",
            Operation::UpdateUser => "update_user",
            Operation::RemoveUser => "remove_user",
        }
    }

    /// The `operationId` of this operation in `openapi/node-api.json` (kebab-case).
    pub fn operation_id(self) -> &'static str {
        match self {
            Operation::Health => "health",
            Operation::ListUsers => "list-users",
            Operation::AddUser => "add-user",
            Operation::UpdateUser => "update-user",
            Operation::RemoveUser => "remove-user",
        }
    }

    /// Whether repeating the call is safe. By contract every operation is idempotent: `add-user`
    /// of an identical present user and `remove-user` of an absent user both succeed.
    pub fn idempotent(self) -> bool {
        true
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Operation {
    type Err = String;

    /// Accepts the label (`list_users`) and the operationId (`list-users`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .into_iter()
            .find(|op| op.as_str() == s || op.operation_id() == s)
            .ok_or_else(|| {
                format!("unknown operation {s:?} (health, list-users, add-user, update-user, remove-user)")
            })
    }
}

/// A user on a node's inbound: the VLESS UUID plus the email/tag Xray keys users by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeUser {
    /// The VLESS client id.
    pub uuid: uuid::Uuid,
    /// Xray's email/tag. Users vpnbot created carry the ownership marker, see [`owned_email`].
    pub email: String,
}

impl NodeUser {
    /// A user owned by vpnbot: its email is [`owned_email`]`(uuid)`.
    pub fn owned(uuid: uuid::Uuid) -> Self {
        Self {
            uuid,
            email: owned_email(uuid),
        }
    }

    /// Whether vpnbot created this user: its email is the ownership marker of exactly its own
    /// UUID, in the current or the legacy form, compared after trimming and ignoring ASCII case
    /// (a panel that lower-cases emails, or an operator's editor, must not orphan a user from
    /// vpnbot's view). See [`marker_matches`].
    pub fn is_owned(&self) -> bool {
        marker_matches(&self.email, self.uuid)
    }
}

/// Prefix of the ownership marker vpnbot writes: `vb.` plus 16 lower-case base32 characters.
pub const OWNED_EMAIL_PREFIX: &str = "vb.";

/// Prefix of the legacy marker (`vb:` plus 16 base64url characters), written before markers
/// had to survive case folding. Still recognised, in any case, never written.
pub const LEGACY_OWNED_EMAIL_PREFIX: &str = "vb:";

/// Length of either marker, bytes.
const MARKER_LEN: usize = 19;

/// The email/tag vpnbot gives the user with `uuid`: `vb.` plus the first 10 UUID bytes in
/// unpadded lower-case base32 (RFC 4648 alphabet), 19 characters in all. Base32 has one letter
/// case, so the marker survives a node or panel that lower- or upper-cases emails (base64url,
/// the legacy form, did not). 80 bits of the UUID (76 random in a v4) suffice: ownership is
/// always checked against the user's own UUID, so the marker only has to be unforgeable by
/// accident, and a 1,000,000-user `list-users` stays under the 64 MiB body cap (about 63 bytes
/// per owned user on the wire, as before).
pub fn owned_email(uuid: uuid::Uuid) -> String {
    let mut s = String::with_capacity(MARKER_LEN);
    s.push_str(OWNED_EMAIL_PREFIX);
    s.push_str(
        &data_encoding::BASE32_NOPAD
            .encode(&uuid.as_bytes()[..10])
            .to_ascii_lowercase(),
    );
    s
}

/// The legacy marker of `uuid`: `vb:` plus the first 12 UUID bytes in unpadded base64url.
pub fn legacy_owned_email(uuid: uuid::Uuid) -> String {
    let mut s = String::with_capacity(MARKER_LEN);
    s.push_str(LEGACY_OWNED_EMAIL_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&uuid.as_bytes()[..12], &mut s);
    s
}

/// Whether `email` is the ownership marker of `uuid`, current or legacy form, after trimming
/// white space and ignoring ASCII case.
pub fn marker_matches(email: &str, uuid: uuid::Uuid) -> bool {
    let e = email.trim();
    if e.len() != MARKER_LEN {
        return false;
    }
    let prefix = &e.as_bytes()[..3];
    if prefix.eq_ignore_ascii_case(OWNED_EMAIL_PREFIX.as_bytes()) {
        e.eq_ignore_ascii_case(&owned_email(uuid))
    } else if prefix.eq_ignore_ascii_case(LEGACY_OWNED_EMAIL_PREFIX.as_bytes()) {
        e.eq_ignore_ascii_case(&legacy_owned_email(uuid))
    } else {
        false
    }
}

/// Whether `email` looks like a marker vpnbot writes (either form, any case, trimmed): the
/// prefix and 16 characters of the marker alphabets. A user that looks marked but is not
/// [`NodeUser::is_owned`] was either copied by hand onto another UUID or mangled by the node
/// (reconcile counts and reports those; it never removes them).
pub fn looks_owned(email: &str) -> bool {
    let e = email.trim();
    e.len() == MARKER_LEN
        && e.is_char_boundary(3)
        && (e[..3].eq_ignore_ascii_case(OWNED_EMAIL_PREFIX)
            || e[..3].eq_ignore_ascii_case(LEGACY_OWNED_EMAIL_PREFIX))
        && e[3..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_email_is_marked_and_bound_to_its_uuid() {
        let id = uuid::Uuid::new_v4();
        let email = owned_email(id);
        assert_eq!(email.len(), 19);
        assert!(email.starts_with("vb."));
        assert_eq!(email, email.to_ascii_lowercase());
        assert!(looks_owned(&email));
        assert!(NodeUser::owned(id).is_owned());
        let copied = NodeUser {
            uuid: uuid::Uuid::new_v4(),
            email: email.clone(),
        };
        assert!(
            !copied.is_owned(),
            "a marker copied onto another UUID is not ours"
        );
        assert!(looks_owned(&copied.email), "but it looks like one");
        for foreign in [
            "alice@example.com",
            "vb:",
            "vb.",
            "vb:short",
            "vb:AAAAAAAAAAAAAAA!",
            "vb.aaaaaaaaaaaaaaa@",
            "",
        ] {
            assert!(!looks_owned(foreign), "{foreign}");
            assert!(!marker_matches(foreign, id), "{foreign}");
        }
    }

    #[test]
    fn markers_survive_case_folding_trimming_and_the_legacy_form() {
        for _ in 0..200 {
            let id = uuid::Uuid::new_v4();
            let new = owned_email(id);
            let legacy = legacy_owned_email(id);
            for email in [
                new.clone(),
                new.to_uppercase(),
                format!("  {new}\n"),
                legacy.clone(),
                legacy.to_lowercase(),
                legacy.to_uppercase(),
                format!("\t{}  ", legacy.to_lowercase()),
            ] {
                let user = NodeUser {
                    uuid: id,
                    email: email.clone(),
                };
                assert!(user.is_owned(), "{email:?} for {id}");
                assert!(looks_owned(&email), "{email:?}");
            }
            // An upper-case UUID from a node parses to the same value as the database's.
            let upper: uuid::Uuid = id.to_string().to_uppercase().parse().unwrap();
            assert_eq!(upper, id);
            // Another UUID's marker, however it is cased, is not ours.
            let other = uuid::Uuid::new_v4();
            assert!(!marker_matches(&owned_email(other).to_uppercase(), id));
            assert!(!marker_matches(
                &legacy_owned_email(other).to_lowercase(),
                id
            ));
        }
    }

    #[test]
    fn operation_parses_label_and_operation_id() {
        for op in Operation::ALL {
            assert_eq!(op.as_str().parse::<Operation>().unwrap(), op);
            assert_eq!(op.operation_id().parse::<Operation>().unwrap(), op);
        }
        assert!("drop-table".parse::<Operation>().is_err());
    }
}
