//! Simulators used only by tests, the demo and operators rehearsing alerts: never on the
//! production path (the `vpnbot` package does not depend on this crate; its tests and the dev
//! tools do).

pub mod botapi;
pub mod node;
pub mod proxy;
