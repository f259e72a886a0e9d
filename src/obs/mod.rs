//! Beside the main runtime: the observability server and the health state it reports.

pub mod health;
pub mod on_demand;
pub mod server;
