//! Secrets in config: stored as [`secrecy::SecretString`] (its `Debug` prints `[REDACTED]`),
//! serialized only through these redacting helpers so `check-config` can print the config.

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;

/// What a secret prints as.
pub const REDACTED: &str = "[REDACTED]";

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

/// Returns `raw` with any password (and `password=` query parameter) replaced by [`REDACTED`];
/// a string that is not a URL is redacted whole.
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
                    let v = if k.eq_ignore_ascii_case("password") {
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
