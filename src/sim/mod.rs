//! Simulators used only by tests, the demo and operators rehearsing alerts: never on the
//! production path.

pub mod botapi;
pub mod node;
pub mod proxy;
