//! `Duration` fields written as seconds (`foo_seconds = 2.5`, `VPNBOT_SECTION__FOO_SECONDS=2.5`):
//! `#[serde(with = "diagnostics::seconds")]`. Parsed once, checked once: a value that is not
//! a finite number from 0 to [`MAX_SECONDS`] (negative, NaN, infinite, `1e30`) is refused while
//! the configuration loads, naming the key, so nothing later converts or overflows at run time.

use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

/// The largest accepted number of seconds (about 31.7 years): no timing of a service means
/// anything beyond it, and sums and multiples of configured durations stay far inside
/// [`Duration`]'s range.
pub const MAX_SECONDS: f64 = 1e9;

const EXPECTED: &str = "a number of seconds from 0 to 1e9";

/// Why a number of seconds was refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("expected a number of seconds from 0 to 1e9, got {0}")]
pub struct SecondsError(pub f64);

/// `v` seconds as a [`Duration`].
///
/// # Errors
/// [`SecondsError`] for a negative, NaN, infinite or larger than [`MAX_SECONDS`] value.
pub fn checked(v: f64) -> Result<Duration, SecondsError> {
    if v.is_finite() && (0.0..=MAX_SECONDS).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(SecondsError(v))
    }
}

/// Serializes as seconds (a float), the form the TOML file uses.
///
/// # Errors
/// The serializer's.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Deserializes seconds (integer or float) into a [`Duration`], refusing what [`checked`]
/// refuses.
///
/// # Errors
/// An invalid-type or invalid-value error (the loader names the key).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Secs;
    impl Visitor<'_> for Secs {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(EXPECTED)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            checked(v).map_err(|_| E::invalid_value(de::Unexpected::Float(v), &EXPECTED))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            checked(v as f64).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &EXPECTED))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            checked(v as f64).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &EXPECTED))
        }
    }
    d.deserialize_any(Secs)
}

/// `Option<Duration>` written as optional seconds:
/// `#[serde(default, with = "diagnostics::seconds::option")]`; absent means `None`.
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Secs(#[serde(with = "super")] Duration);

    /// Serializes `Some` as seconds (a float); `None` as nothing.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    /// Deserializes optional seconds, refusing what [`super::checked`] refuses.
    ///
    /// # Errors
    /// As [`super::deserialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Secs>::deserialize(d)?.map(|s| s.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finite_non_negative_bounded_seconds_pass() {
        assert_eq!(checked(2.5), Ok(Duration::from_millis(2500)));
        assert_eq!(checked(0.0), Ok(Duration::ZERO));
        assert_eq!(checked(MAX_SECONDS), Ok(Duration::from_secs(1_000_000_000)));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e30, MAX_SECONDS * 1.01] {
            assert!(checked(bad).is_err(), "{bad}");
        }
    }
}
