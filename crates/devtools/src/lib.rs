//! vpnbot's developer tools: the demo (`vpnbot-demo`, the README's first command through
//! `scripts/demo.sh`) and the load benchmarks (`vpnbot-bench NAME`). They drive the production
//! code (`vpnbot`'s `App`, runtime and subscriber) against the simulators (`vpnbot-sim`); the
//! production `vpnbot` binary contains neither.

pub mod bench;
pub mod demo;
