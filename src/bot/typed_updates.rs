//! `getUpdates` that keeps, for an update teloxide cannot parse, its id and its type (the name
//! of its one field besides `update_id`, e.g. `message`), never its content: teloxide turns such
//! an update into an empty `UpdateKind::Error` and drops what it was.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use teloxide::requests::{JsonRequest, Payload};
use teloxide::types::{AllowedUpdate, Update, UpdateKind};
use teloxide::Bot;

/// The update kinds the bot asks for.
pub(crate) const ALLOWED_UPDATES: [AllowedUpdate; 6] = [
    AllowedUpdate::Message,
    AllowedUpdate::EditedMessage,
    AllowedUpdate::CallbackQuery,
    AllowedUpdate::PreCheckoutQuery,
    AllowedUpdate::ChannelPost,
    AllowedUpdate::MyChatMember,
];

/// The `getUpdates` payload (same fields as teloxide's), answered with [`TypedUpdate`]s.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GetUpdatesTyped {
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i32>,
    limit: u8,
    timeout: u32,
    allowed_updates: Vec<AllowedUpdate>,
}

impl Payload for GetUpdatesTyped {
    type Output = Vec<TypedUpdate>;
    const NAME: &'static str = "GetUpdates";

    fn timeout_hint(&self) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(self.timeout)))
    }
}

/// A `getUpdates` request on `bot`: long poll of `timeout` seconds, up to `limit` updates from
/// `offset`, of the kinds in [`ALLOWED_UPDATES`].
pub(crate) fn get_updates(
    bot: &Bot,
    offset: Option<i32>,
    limit: u8,
    timeout: u32,
) -> JsonRequest<GetUpdatesTyped> {
    JsonRequest::new(
        bot.clone(),
        GetUpdatesTyped {
            offset,
            limit,
            timeout,
            allowed_updates: ALLOWED_UPDATES.to_vec(),
        },
    )
}

/// An update with, when teloxide could not parse it, the type it had.
#[derive(Debug, Clone)]
pub(crate) struct TypedUpdate {
    pub(crate) update: Update,
    /// The update's type when it could not be parsed (bounded: `[a-z_]`, at most 40
    /// characters, else `invalid`); `None` for a parsed update.
    pub(crate) unparsed_type: Option<String>,
}

impl<'de> Deserialize<'de> for TypedUpdate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let update = Update::deserialize(&value).map_err(serde::de::Error::custom)?;
        let unparsed_type = matches!(update.kind, UpdateKind::Error(_)).then(|| {
            value
                .as_object()
                .and_then(|o| o.keys().find(|k| k.as_str() != "update_id"))
                .map(|k| {
                    let ok = !k.is_empty()
                        && k.len() <= 40
                        && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                    if ok {
                        k.clone()
                    } else {
                        "invalid".to_string()
                    }
                })
                .unwrap_or_else(|| "none".to_string())
        });
        Ok(TypedUpdate {
            update,
            unparsed_type,
        })
    }
}

/// Logs every update that could not be parsed (its id and type, never its content) and returns
/// the updates. They are still handled (and counted as `unparsed`) like any other.
pub(crate) fn log_unparsed(updates: Vec<TypedUpdate>) -> Vec<Update> {
    updates
        .into_iter()
        .map(|t| {
            if let Some(kind) = &t.unparsed_type {
                tracing::warn!(
                    update_id = t.update.id.0,
                    update_type = %kind,
                    "Telegram update could not be parsed; ignored (content not logged)"
                );
            }
            t.update
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparsed_updates_keep_id_and_type_only() {
        let list: Vec<TypedUpdate> = serde_json::from_value(serde_json::json!([
            {"update_id": 7, "message": {"message_id": "NaN", "text": "secret"}},
            {"update_id": 8, "Weird-Kind!": {"a": 1}},
            {"update_id": 9},
            {"update_id": 10, "edited_message": {"message_id": 1, "date": 0,
              "chat": {"id": 1, "type": "private"}, "text": "hi", "edit_date": 0}},
        ]))
        .unwrap();
        let types: Vec<_> = list
            .iter()
            .map(|t| (t.update.id.0, t.unparsed_type.clone()))
            .collect();
        assert_eq!(
            types,
            [
                (7, Some("message".into())),
                (8, Some("invalid".into())),
                (9, Some("none".into())),
                (10, None),
            ]
        );
    }
}
