//! `vpnbot webhook set|delete|info`: switching between polling and webhook mode, with
//! teloxide's requests (`setWebhook`, `deleteWebhook`, `getWebhookInfo`). The secret token is
//! sent to Telegram and never printed.
//!
//! To webhook mode: `vpnbot webhook set`, then restart the instances with
//! `telegram.mode = "webhook"` (until then the polling leader gets `409` and logs it). Back to
//! polling: `vpnbot webhook delete` (pending updates are kept), then `telegram.mode =
//! "polling"`.

use std::future::IntoFuture;
use std::process::ExitCode;

use secrecy::ExposeSecret;
use teloxide::payloads::{DeleteWebhookSetters, SetWebhookSetters};
use teloxide::prelude::Requester;
use teloxide::types::AllowedUpdate;

use super::{BotApi, BotMetrics};
use crate::config::{secret::redact_url, Config, EXIT_CONFIG};

/// What `vpnbot webhook` does.
#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum WebhookCommand {
    /// `setWebhook` with `telegram.webhook.public_url`, `secret_token`, `max_connections` and
    /// `allowed_updates`, keeping pending updates (`drop_pending_updates = false`). Exit 64
    /// when `public_url` or `secret_token` is missing, 1 when Telegram refuses.
    Set,
    /// `deleteWebhook` (pending updates kept), to return to polling. Exit 1 when Telegram
    /// refuses.
    Delete,
    /// `getWebhookInfo`: the URL Telegram posts to, pending updates, its last delivery error.
    Info,
}

/// A name in `telegram.webhook.allowed_updates` that is not a Telegram update type.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a Telegram update type")]
pub struct UnknownUpdateType(pub String);

/// The update kinds `allowed_updates` names (empty: the kinds the bot handles).
///
/// # Errors
/// A name that is not a Telegram update type (`check-config` reports it first).
pub fn allowed_updates(names: &[String]) -> Result<Vec<AllowedUpdate>, UnknownUpdateType> {
    if names.is_empty() {
        return Ok(super::typed_updates::ALLOWED_UPDATES.to_vec());
    }
    names
        .iter()
        .map(|n| {
            serde_json::from_value(serde_json::Value::String(n.clone()))
                .map_err(|_| UnknownUpdateType(n.clone()))
        })
        .collect()
}

/// Exit 0 after printing what `ok` says of the answer, or exit 1 naming Telegram's refusal.
fn report<T, E: std::error::Error>(res: Result<T, E>, ok: impl FnOnce(T)) -> ExitCode {
    match res {
        Ok(v) => {
            ok(v);
            ExitCode::SUCCESS
        }
        Err(e) => crate::cli::fail(&e, 1),
    }
}

/// Runs `vpnbot webhook <cmd>` with `cfg` on a short-command runtime; returns the exit code.
pub fn main(cfg: Config, cmd: WebhookCommand) -> ExitCode {
    crate::telemetry::init(&cfg.observability, Vec::new());
    if cfg.telegram.token.expose_secret().is_empty() {
        eprintln!("error: telegram.token is empty");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let rt = crate::cli::build_runtime(&cfg);
    rt.block_on(run(&cfg, cmd))
}

async fn run(cfg: &Config, cmd: WebhookCommand) -> ExitCode {
    let registry = crate::metrics::new_registry();
    let api = match BotApi::new(&cfg.telegram, &cfg.bot, BotMetrics::register(&registry)) {
        Ok(a) => a,
        Err(e) => return crate::cli::fail(&e, 1),
    };
    let w = &cfg.telegram.webhook;
    match cmd {
        WebhookCommand::Set => {
            let mut problems = Vec::new();
            let url = match reqwest::Url::parse(&w.public_url) {
                Ok(u) => Some(u),
                Err(_) => {
                    problems.push("telegram.webhook.public_url is empty or not a URL");
                    None
                }
            };
            let secret = w.secret_token.expose_secret().to_string();
            if secret.is_empty() {
                problems.push("telegram.webhook.secret_token is empty");
            }
            let allowed = match allowed_updates(&w.allowed_updates) {
                Ok(a) => a,
                Err(_) => {
                    problems.push("telegram.webhook.allowed_updates names an unknown type");
                    Vec::new()
                }
            };
            let (Some(url), true) = (url, problems.is_empty()) else {
                for p in problems {
                    eprintln!("error: {p}");
                }
                return ExitCode::from(EXIT_CONFIG as u8);
            };
            let res = api
                .call("setWebhook", || {
                    api.bot
                        .set_webhook(url.clone())
                        .secret_token(secret.clone())
                        .max_connections(w.max_connections)
                        .allowed_updates(allowed.clone())
                        .drop_pending_updates(false)
                        .into_future()
                })
                .await;
            report(res, |_| {
                println!(
                    "webhook set: {} (max_connections {}, allowed_updates {}); pending \
                     updates kept. Run the instances with telegram.mode = \"webhook\".",
                    redact_url(url.as_str()),
                    w.max_connections,
                    names(&allowed)
                );
            })
        }
        WebhookCommand::Delete => {
            let res = api
                .call("deleteWebhook", || {
                    api.bot
                        .delete_webhook()
                        .drop_pending_updates(false)
                        .into_future()
                })
                .await;
            report(res, |_| {
                println!(
                    "webhook deleted; pending updates kept for getUpdates. Run the \
                     instances with telegram.mode = \"polling\"."
                );
            })
        }
        WebhookCommand::Info => {
            let res = api
                .call("getWebhookInfo", || {
                    api.bot.get_webhook_info().into_future()
                })
                .await;
            report(res, |info| {
                match &info.url {
                    Some(u) => println!("url: {}", redact_url(u.as_str())),
                    None => println!("url: (none: polling mode)"),
                }
                println!("pending_update_count: {}", info.pending_update_count);
                if let Some(n) = info.max_connections {
                    println!("max_connections: {n}");
                }
                if let Some(a) = &info.allowed_updates {
                    println!("allowed_updates: {}", names(a));
                }
                if let Some(ip) = info.ip_address {
                    println!("ip_address: {ip}");
                }
                if let Some(d) = info.last_error_date {
                    println!(
                        "last_error: {d} {}",
                        info.last_error_message.as_deref().unwrap_or("")
                    );
                }
            })
        }
    }
}

fn names(a: &[AllowedUpdate]) -> String {
    let v: Vec<String> = a
        .iter()
        .filter_map(|u| serde_json::to_value(u).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    format!("[{}]", v.join(", "))
}
