//! The wire format of the node API contract (`openapi/node-api.json`), shared by the client, the
//! simulator and the agent so that all follow one definition.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{NodeUser, Operation};

/// Header carrying the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Path of the health endpoint.
pub const HEALTH_PATH: &str = "/v1/health";
/// Path of the user collection (`list-users`, `add-user`).
pub const USERS_PATH: &str = "/v1/users";

/// HTTP method of `op`.
pub fn method(op: Operation) -> &'static str {
    match op {
        Operation::Health | Operation::ListUsers => "GET",
        Operation::AddUser => "POST",
        Operation::UpdateUser => "PUT",
        Operation::RemoveUser => "DELETE",
    }
}

/// Path template of `op` as written in the OpenAPI document.
pub fn path_template(op: Operation) -> &'static str {
    match op {
        Operation::Health => HEALTH_PATH,
        Operation::ListUsers | Operation::AddUser => USERS_PATH,
        Operation::UpdateUser | Operation::RemoveUser => "/v1/users/{uuid}",
    }
}

/// `GET /v1/health` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthResponse {
    /// Always `"ok"`.
    pub status: String,
    /// Users on the inbound.
    pub users: u64,
}

/// Body of `add-user` and `update-user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    /// The VLESS UUID.
    pub uuid: uuid::Uuid,
    /// The email/tag.
    pub email: String,
}

/// Answer of the mutating operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutationResponse {
    /// `created`, `unchanged`, `updated`, `removed` or `absent`.
    pub result: MutationResult,
}

/// Effect of a mutating operation. `unchanged` and `absent` make retries safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationResult {
    /// The user was added.
    Created,
    /// An identical user was already present.
    Unchanged,
    /// The user's email was replaced.
    Updated,
    /// The user was removed.
    Removed,
    /// The user was already absent.
    Absent,
}

/// Error body of non-2xx answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Short machine-readable reason.
    pub error: String,
}

/// `GET /v1/users` answer: `{"users": [["<uuid>", "<email>"], ...]}`. Pairs rather than objects
/// keep 1,000,000 users under the 64 MiB body cap (about 63 bytes per owned user).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListUsersResponse {
    /// Every user on the node's inbound.
    #[serde(deserialize_with = "users_from_pairs")]
    pub users: Vec<NodeUser>,
}

/// First bytes of a `list-users` body; then [`write_list_pair`] per user, then
/// [`LIST_USERS_CLOSE`]. Lets a server stream the body in chunks.
pub const LIST_USERS_OPEN: &[u8] = b"{\"users\":[";
/// Last bytes of a `list-users` body.
pub const LIST_USERS_CLOSE: &[u8] = b"]}";

/// Appends one `["<uuid>","<email>"]` pair to `out`, preceded by a comma unless `first`.
pub fn write_list_pair(out: &mut Vec<u8>, first: bool, id: &uuid::Uuid, email: &str) {
    if !first {
        out.push(b',');
    }
    let mut ubuf = uuid::Uuid::encode_buffer();
    out.extend_from_slice(b"[\"");
    out.extend_from_slice(id.hyphenated().encode_lower(&mut ubuf).as_bytes());
    out.extend_from_slice(b"\",");
    // serde_json escapes whatever an operator put into an email.
    serde_json::to_writer(&mut *out, email).expect("writing to a Vec cannot fail");
    out.push(b']');
}

/// Writes the `list-users` body for `users` into `out`.
pub fn write_list_users<'a>(
    out: &mut Vec<u8>,
    users: impl ExactSizeIterator<Item = (&'a uuid::Uuid, &'a str)>,
) {
    out.reserve(16 + users.len() * 72);
    out.extend_from_slice(LIST_USERS_OPEN);
    for (i, (id, email)) in users.enumerate() {
        write_list_pair(out, i == 0, id, email);
    }
    out.extend_from_slice(LIST_USERS_CLOSE);
}

fn users_from_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<NodeUser>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<NodeUser>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of [uuid, email] pairs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            #[derive(Deserialize)]
            struct Pair<'a>(#[serde(borrow)] Cow<'a, str>, String);
            while let Some(Pair(id, email)) = seq.next_element::<Pair<'de>>()? {
                let uuid = uuid::Uuid::try_parse(&id).map_err(|_| {
                    de::Error::custom(format_args!(
                        "entry {} is not a UUID: {:?}",
                        out.len(),
                        truncate(&id, 40)
                    ))
                })?;
                out.push(NodeUser { uuid, email });
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
