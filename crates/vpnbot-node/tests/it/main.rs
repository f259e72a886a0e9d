//! vpnbot-node's integration tests: one binary, one module per area, shared helpers in
//! [`common`]. Tests on a real `v2ray` fail when it is missing unless `ALLOW_SKIP_TESTS=1`.

mod common;

mod cli;
mod deploy;
mod standin;
mod v2ray;
