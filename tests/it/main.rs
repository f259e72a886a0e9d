//! vpnbot's integration tests: one binary, one module per area, shared helpers in [`helpers`]
//! (the layout of zero2prod's `tests/api/`). Tests that need a process of their own (they
//! install process-wide state: the global tracing subscriber, environment variables, or measure
//! the process's memory) run in a child process through `rusty_fork`.
//!
//! Tests that need an external tool (PostgreSQL, `promtool`, `prometheus`, `alertmanager`,
//! `pgbouncer`, `systemd-analyze`, `v2ray`, root for mount namespaces) **fail** when it is missing,
//! unless `ALLOW_SKIP_TESTS=1` is set: then they print `SKIPPED: ...` and pass.
#![allow(clippy::async_yields_async, clippy::let_underscore_future)]

mod helpers;

mod app;
mod bot;
mod bot_deadlines;
mod bot_faults;
mod bot_payments;
mod bot_resilience;
mod bot_webhook;
mod cli;
mod cli_exit;
mod config;
mod console_retention;
mod db_connect;
mod db_pool;
mod db_pooler;
mod db_refusal;
mod db_stall;
mod demo;
mod diagnostics_stalls;
mod metrics_contract;
mod node_agent_e2e;
mod node_faults;
mod node_openapi;
mod node_sim;
mod ops_alerts;
mod ops_contract;
mod ops_dashboards;
mod ops_debug_listener;
mod ops_deploy;
mod ops_otel;
mod ops_pager;
mod ops_systemd;
mod outbox;
mod reconcile;
mod reconcile_cli;
mod scale_out;
mod telemetry_cost;
