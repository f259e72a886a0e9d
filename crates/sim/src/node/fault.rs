//! Faults the node simulator can inject, one per operation (FAULTS.md rows N1 to N12).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How the simulator misbehaves for one operation. Text form (CLI `--fault op=MODE`, admin
/// endpoint): the snake_case name, with `:ARG` for the modes that take one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serve the contract faithfully.
    #[default]
    None,
    /// `delay:MS`: answer normally after MS milliseconds.
    Delay(Duration),
    /// N1 `headers_then_silence`: `200` head with a Content-Length, then no byte; socket open.
    HeadersThenSilence,
    /// N2 `trickle:MS`: the real body, one byte every MS milliseconds.
    Trickle(Duration),
    /// N3 `endless_chunked`: a chunked `list-users` body of valid entries that never ends.
    EndlessChunked,
    /// N5 `short_body`: half the body under the full Content-Length, then FIN.
    ShortBody,
    /// N5 `reset_mid_body`: half the body, then a TCP reset.
    ResetMidBody,
    /// N4 `no_headers`: read the request, never answer; socket open.
    NoHeaders,
    /// N5 `reset`: read the request, then a TCP reset.
    Reset,
    /// N6 `status:CODE`: answer CODE (e.g. 500, 502, 503) with an error body.
    Status(u16),
    /// N6 `rate_limited:SECS`: 429 with `Retry-After: SECS`.
    RateLimited(u64),
    /// N6 `flaky:N`: the next N requests get 503, then the fault clears itself.
    Flaky(u32),
    /// N7 `malformed_json`: 200 with a body that is not JSON.
    MalformedJson,
    /// N7 `wrong_schema`: 200 with JSON of another shape.
    WrongSchema,
    /// N7 `non_uuid`: 200 with a list whose entries are not UUIDs.
    NonUuid,
    /// N9 `auth_reject`: 401 whatever the key.
    AuthReject,
    /// N12 `apply_then_500`: apply the change, answer 500.
    ApplyThen500,
    /// N12 `apply_then_drop`: apply the change, close the connection without an answer.
    ApplyThenDrop,
    /// N10 `stale_keepalive`: answer the first request of each connection, then close the
    /// connection on the next request without answering (the idle keep-alive race, made
    /// deterministic).
    StaleKeepAlive,
    /// `redirect:PORT`: `307` to the same path on `127.0.0.1:PORT` (another server), whatever
    /// the request; a client that follows it sends its API key there.
    Redirect(u16),
    /// `gzip`: the real answer gzip-compressed with `Content-Encoding: gzip`, although the
    /// client never asked for it (a proxy that compresses anyway).
    Gzip,
    /// `fold_case`: `list-users` as a panel that normalises identities serves it: every email
    /// lower-cased, every UUID upper-cased.
    FoldCase,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::Delay(d) => write!(f, "delay:{}", d.as_millis()),
            Fault::HeadersThenSilence => f.write_str("headers_then_silence"),
            Fault::Trickle(d) => write!(f, "trickle:{}", d.as_millis()),
            Fault::EndlessChunked => f.write_str("endless_chunked"),
            Fault::ShortBody => f.write_str("short_body"),
            Fault::ResetMidBody => f.write_str("reset_mid_body"),
            Fault::NoHeaders => f.write_str("no_headers"),
            Fault::Reset => f.write_str("reset"),
            Fault::Status(c) => write!(f, "status:{c}"),
            Fault::RateLimited(s) => write!(f, "rate_limited:{s}"),
            Fault::Flaky(n) => write!(f, "flaky:{n}"),
            Fault::MalformedJson => f.write_str("malformed_json"),
            Fault::WrongSchema => f.write_str("wrong_schema"),
            Fault::NonUuid => f.write_str("non_uuid"),
            Fault::AuthReject => f.write_str("auth_reject"),
            Fault::ApplyThen500 => f.write_str("apply_then_500"),
            Fault::ApplyThenDrop => f.write_str("apply_then_drop"),
            Fault::StaleKeepAlive => f.write_str("stale_keepalive"),
            Fault::Redirect(port) => write!(f, "redirect:{port}"),
            Fault::Gzip => f.write_str("gzip"),
            Fault::FoldCase => f.write_str("fold_case"),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |what: &str| -> Result<u64, String> {
            arg.ok_or_else(|| format!("fault {name} needs :{what}"))?
                .parse::<u64>()
                .map_err(|_| format!("fault {name}: {what} must be a whole number"))
        };
        let f = match name {
            "none" => Fault::None,
            "delay" => Fault::Delay(Duration::from_millis(num("MS")?)),
            "headers_then_silence" => Fault::HeadersThenSilence,
            "trickle" => Fault::Trickle(Duration::from_millis(num("MS")?)),
            "endless_chunked" => Fault::EndlessChunked,
            "short_body" => Fault::ShortBody,
            "reset_mid_body" => Fault::ResetMidBody,
            "no_headers" => Fault::NoHeaders,
            "reset" => Fault::Reset,
            "status" => {
                let c = num("CODE")?;
                if !(100..=599).contains(&c) {
                    return Err(format!("status code {c} out of range"));
                }
                Fault::Status(c as u16)
            }
            "rate_limited" => Fault::RateLimited(num("SECS")?),
            "flaky" => Fault::Flaky(u32::try_from(num("N")?).map_err(|e| e.to_string())?),
            "malformed_json" => Fault::MalformedJson,
            "wrong_schema" => Fault::WrongSchema,
            "non_uuid" => Fault::NonUuid,
            "auth_reject" => Fault::AuthReject,
            "apply_then_500" => Fault::ApplyThen500,
            "apply_then_drop" => Fault::ApplyThenDrop,
            "stale_keepalive" => Fault::StaleKeepAlive,
            "redirect" => Fault::Redirect(
                u16::try_from(num("PORT")?).map_err(|_| "fault redirect: PORT out of range")?,
            ),
            "gzip" => Fault::Gzip,
            "fold_case" => Fault::FoldCase,
            other => return Err(format!("unknown fault {other:?}")),
        };
        let takes_arg = matches!(
            f,
            Fault::Delay(_)
                | Fault::Trickle(_)
                | Fault::Status(_)
                | Fault::RateLimited(_)
                | Fault::Flaky(_)
                | Fault::Redirect(_)
        );
        if arg.is_some() && !takes_arg {
            return Err(format!("fault {name} takes no argument"));
        }
        Ok(f)
    }
}

/// Parses `op=MODE` (e.g. `list-users=headers_then_silence`), the CLI's `--fault` value.
pub fn parse_fault_spec(s: &str) -> Result<(node_api::Operation, Fault), String> {
    let (op, mode) = s
        .split_once('=')
        .ok_or_else(|| format!("expected OP=MODE, got {s:?}"))?;
    Ok((op.trim().parse()?, mode.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_round_trips_through_text() {
        let all = [
            Fault::None,
            Fault::Delay(Duration::from_millis(5)),
            Fault::HeadersThenSilence,
            Fault::Trickle(Duration::from_millis(300)),
            Fault::EndlessChunked,
            Fault::ShortBody,
            Fault::ResetMidBody,
            Fault::NoHeaders,
            Fault::Reset,
            Fault::Status(503),
            Fault::RateLimited(1),
            Fault::Flaky(2),
            Fault::MalformedJson,
            Fault::WrongSchema,
            Fault::NonUuid,
            Fault::AuthReject,
            Fault::ApplyThen500,
            Fault::ApplyThenDrop,
            Fault::StaleKeepAlive,
            Fault::Redirect(8080),
            Fault::Gzip,
            Fault::FoldCase,
        ];
        for f in all {
            assert_eq!(f.to_string().parse::<Fault>().unwrap(), f);
        }
        assert!("status".parse::<Fault>().is_err());
        assert!("reset:3".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
        let (op, f) = parse_fault_spec("list-users=status:502").unwrap();
        assert_eq!(
            (op, f),
            (node_api::Operation::ListUsers, Fault::Status(502))
        );
    }
}
