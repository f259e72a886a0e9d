//! Expiry.
