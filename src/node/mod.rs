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
pub use error::NodeError;
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

    /// Whether vpnbot created this user: its email is exactly [`owned_email`] of its UUID
    /// (stricter than [`is_owned`], which checks the marker alone).
    pub fn is_owned(&self) -> bool {
        self.email == owned_email(self.uuid)
    }
}

/// Prefix that marks an email/tag as created by vpnbot.
pub const OWNED_EMAIL_PREFIX: &str = "vb:";

/// The email/tag vpnbot gives the user with `uuid`: `vb:` plus the first 12 UUID bytes in
/// unpadded base64url (19 characters in all; 90 random bits of a v4 UUID, so collisions among
/// millions of users are negligible). Kept short because a 1,000,000-user `list-users` must
/// stay under the 64 MiB body cap: about 63 bytes per owned user on the wire.
pub fn owned_email(uuid: uuid::Uuid) -> String {
    let mut s = String::with_capacity(19);
    s.push_str(OWNED_EMAIL_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&uuid.as_bytes()[..12], &mut s);
    s
}

/// Whether `email` carries vpnbot's ownership marker: `vb:` followed by exactly 16 base64url
/// characters. vpnbot never touches users for which this is false. See also
/// [`NodeUser::is_owned`], which also checks that the email belongs to the user's UUID.
pub fn is_owned(email: &str) -> bool {
    email.strip_prefix(OWNED_EMAIL_PREFIX).is_some_and(|rest| {
        rest.len() == 16
            && base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rest)
                .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_email_is_marked_and_bound_to_its_uuid() {
        let id = uuid::Uuid::new_v4();
        let email = owned_email(id);
        assert_eq!(email.len(), 19);
        assert!(is_owned(&email));
        assert!(NodeUser::owned(id).is_owned());
        let copied = NodeUser {
            uuid: uuid::Uuid::new_v4(),
            email,
        };
        assert!(
            !copied.is_owned(),
            "a marker copied onto another UUID is not ours"
        );
        for foreign in [
            "alice@example.com",
            "vb:",
            "vb:short",
            "VB:AAAAAAAAAAAAAAAA",
            "vb:AAAAAAAAAAAAAAA!",
            "",
        ] {
            assert!(!is_owned(foreign), "{foreign}");
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
