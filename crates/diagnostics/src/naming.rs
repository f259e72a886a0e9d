//! The service's name in what the diagnostics create: metric names (`<service>_runtime_...`),
//! thread names (`<service>-watchdog`, `<service>-wrk-N`) and dump file names
//! (`<service>-dump-...json`). Given once, to [`crate::Diagnostics::new`]; log events use the
//! fixed target `diagnostics::watchdog` (a `tracing` target must be known at compile time).

/// How the diagnostics name what they create, from one service name.
///
/// The name should be a short lower-case word (ASCII letters, digits, `_`): it starts every
/// metric name, and Linux keeps only 15 bytes of a thread name (`ps`, `top`, `/proc`), so with
/// more than 6 bytes `<service>-watchdog` is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    service: &'static str,
}

impl Naming {
    /// Names after `service`.
    ///
    /// # Panics
    /// When `service` is empty or holds anything but ASCII letters, digits and `_` (it would
    /// make invalid metric names); in a `const` context this fails the build.
    pub const fn new(service: &'static str) -> Naming {
        let b = service.as_bytes();
        assert!(!b.is_empty(), "service name must not be empty");
        let mut i = 0;
        while i < b.len() {
            assert!(
                b[i].is_ascii_alphanumeric() || b[i] == b'_',
                "service name: ASCII letters, digits and _ only"
            );
            i += 1;
        }
        assert!(
            !b[0].is_ascii_digit(),
            "service name must not start with a digit"
        );
        Naming { service }
    }

    /// The service name itself.
    pub fn service(self) -> &'static str {
        self.service
    }

    /// A metric family name: `<service>_<name>`.
    pub fn metric(self, name: &str) -> String {
        format!("{}_{name}", self.service)
    }

    /// A thread name: `<service>-<role>`.
    pub fn thread(self, role: &str) -> String {
        format!("{}-{role}", self.service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_service() {
        const N: Naming = Naming::new("shop");
        assert_eq!(N.metric("runtime_workers"), "shop_runtime_workers");
        assert_eq!(N.thread("watchdog"), "shop-watchdog");
        assert!(std::panic::catch_unwind(|| Naming::new("my-svc")).is_err());
        assert!(std::panic::catch_unwind(|| Naming::new("")).is_err());
    }
}
