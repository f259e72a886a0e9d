//! The wire format of the node API contract, defined once in the `node-api` crate and
//! re-exported here so vpnbot's code and tests keep their paths.

pub use node_api::wire::*;
