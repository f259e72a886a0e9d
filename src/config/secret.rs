//! Secrets in config: stored as [`secrecy::SecretString`] (its `Debug` prints `[REDACTED]`),
//! serialized only through these redacting helpers so `check-config` can print the config.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserializer, Serializer};

/// What a secret prints as.
pub const REDACTED: &str = "[REDACTED]";

/// A secret field: `#[serde(with = "secret::redacted")]` (printed as [`REDACTED`] when set,
/// read leniently by [`deserialize_lenient`]).
pub mod redacted {
    pub use super::deserialize_lenient as deserialize;
    pub use super::serialize_redacted as serialize;
}

/// A secret URL field: `#[serde(with = "secret::redacted_url")]` (printed with its password
/// and secret-looking query values redacted, read leniently).
pub mod redacted_url {
    pub use super::deserialize_lenient as deserialize;
    pub use super::serialize_redacted_url as serialize;
}

/// Serializes a present secret as [`REDACTED`] and an empty one as `""`, so the printed config
/// still says whether it is set.
pub fn serialize_redacted<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    if s.expose_secret().is_empty() {
        ser.serialize_str("")
    } else {
        ser.serialize_str(REDACTED)
    }
}

/// Serializes a database URL with its password replaced by [`REDACTED`].
pub fn serialize_redacted_url<S: Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&redact_url(s.expose_secret()))
}

/// Serializes a plain URL string with credentials and secret-looking query values redacted.
pub fn serialize_redacted_url_str<S: Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&redact_url(s))
}

/// Deserializes a secret from a string or a number: an all-digit API key or token given as
/// `VPNBOT_...=8472919283` arrives from the environment as an integer.
pub fn deserialize_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = SecretString;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretString, E> {
            Ok(SecretString::from(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SecretString, E> {
            Ok(SecretString::from(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SecretString, E> {
            Ok(SecretString::from(v.to_string()))
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<SecretString, E> {
            Ok(SecretString::from(v.to_string()))
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<SecretString, E> {
            Ok(SecretString::from(v.to_string()))
        }
    }
    d.deserialize_any(V)
}

/// Query keys whose values are redacted: anything naming a password, secret, token or key.
fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["pass", "secret", "token", "key", "auth", "signature"]
        .iter()
        .any(|w| k.contains(w))
}

/// Returns `raw` with any password (and query values whose key names a password, secret, token
/// or key) replaced by [`REDACTED`]; a string that is not a URL is redacted whole.
pub fn redact_url(raw: &str) -> String {
    if raw.is_empty() {
        return String::new();
    }
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some(REDACTED));
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if is_secret_key(&k) {
                        REDACTED.to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => REDACTED.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted() {
        let out = redact_url("postgres://bot:hunter2@db:5432/vpn?password=x&sslmode=off");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("password=x"), "{out}");
        assert!(out.contains("sslmode=off"));
    }

    #[test]
    fn non_url_is_redacted_whole() {
        assert_eq!(redact_url("host=db password=hunter2"), REDACTED);
    }
}
