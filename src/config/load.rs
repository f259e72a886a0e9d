//! Loading: the TOML file and the configuration namespace of the environment merged, then every
//! problem collected in one pass.
//!
//! # Two namespaces under `VPNBOT_`
//! A configuration key from the environment is `VPNBOT_<SECTION>__<KEY>` (further levels also
//! joined by `__`, e.g. `VPNBOT_NODES__A__API_KEY`), where `<SECTION>` is one of the config
//! tables ([`SECTIONS`]). A `VPNBOT_` name without `__` is not configuration and the loader
//! ignores it: `VPNBOT_CONFIG` (the `--config` file), `VPNBOT_SIM_API_KEY` (`vpnbot-sim node`),
//! `VPNBOT_TEST_PGDATA`/`VPNBOT_TEST_PGPORT` (the test scripts) and the internal child-process
//! markers ([`NON_CONFIG_ENV`]). Such names must not start with a section name followed by `_`:
//! `VPNBOT_DB_URL` is taken for a mistyped `VPNBOT_DB__URL` and refused.
//!
//! # Every problem at once
//! Each section is deserialized on its own; a key that fails (unknown, wrong type) is reported,
//! removed, and the section deserialized again, so one run lists every unknown key and type
//! error, then every invalid value ([`Config::validate`]). A problem that comes from the
//! environment names the variable.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use super::{Config, ConfigErrors, ENV_PREFIX};

/// The top-level tables of the configuration, in file order.
pub const SECTIONS: &[&str] = &[
    "telegram",
    "db",
    "leader",
    "observability",
    "runtime",
    "node_client",
    "outbox",
    "diagnostics",
    "reconcile",
    "bot",
    "nodes",
];

/// `VPNBOT_` environment variables the process uses that are not configuration keys (none
/// contains `__`, none starts with a section name and `_`).
pub const NON_CONFIG_ENV: &[&str] = &[
    "VPNBOT_CONFIG",
    "VPNBOT_SIM_API_KEY",
    "VPNBOT_TEST_PGDATA",
    "VPNBOT_TEST_PGPORT",
    // `vpnbot_devtools::bench::reconcile::SIM_CHILD_ENV`: the reconcile benchmark's simulator child.
    "VPNBOT_BENCH_SIM_USERS",
];

/// Separator of nesting levels in a configuration variable's name.
const ENV_SPLIT: &str = "__";

/// Bound on remove-and-retry passes per section (each pass removes one key).
const MAX_PASSES: usize = 256;

/// Lowest [`strsim::jaro`] similarity for a "did you mean" (the threshold clap uses).
const SUGGEST_MIN_SIMILARITY: f64 = 0.7;

/// One configuration variable from the environment.
#[derive(Debug, Clone)]
struct EnvKey {
    /// The variable's name as set.
    name: String,
    /// The config path it sets, lower case: `["db", "max_connections"]`.
    path: Vec<String>,
    /// Its raw value (parsed like figment's `Env` provider does).
    value: String,
}

/// The environment's configuration namespace, as a figment provider.
struct EnvProvider<'a>(&'a [EnvKey]);

impl Provider for EnvProvider<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variables")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for k in self.0 {
            let value: Value = k.value.parse().expect("parsing a Value is infallible");
            insert_path(&mut dict, &k.path, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [leaf] => {
            dict.insert(leaf.clone(), value);
        }
        [first, rest @ ..] => {
            let child = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(child, Value::Dict(..)) {
                *child = Value::from(Dict::new());
            }
            if let Value::Dict(_, d) = child {
                insert_path(d, rest, value);
            }
        }
    }
}

/// Splits the process environment into configuration variables and problems with
/// `VPNBOT_*` names; everything else is ignored.
fn scan_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    errors: &mut Vec<String>,
) -> Vec<EnvKey> {
    let mut keys = Vec::new();
    let mut vars: Vec<(String, OsString)> = vars
        .into_iter()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, value) in vars {
        let Some(rest) = strip_prefix_ignore_case(&name, ENV_PREFIX) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        if !lower.contains(ENV_SPLIT) {
            if let Some(section) = SECTIONS
                .iter()
                .find(|s| lower.starts_with(&format!("{s}_")) && lower.len() > s.len() + 1)
            {
                let key = &lower[section.len() + 1..];
                let fix = if *section == "nodes" {
                    format!("{ENV_PREFIX}NODES__<NAME>__<KEY>")
                } else {
                    env_name(&[section.to_string(), key.to_string()])
                };
                errors.push(format!(
                    "{name}: not a configuration variable (those are \
                     {ENV_PREFIX}<SECTION>__<KEY>, two underscores after the section); \
                     did you mean {fix}?"
                ));
            }
            continue;
        }
        let path: Vec<String> = lower.split(ENV_SPLIT).map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            errors.push(format!(
                "{name}: empty key segment (levels are joined by a double underscore, e.g. \
                 {ENV_PREFIX}DB__MAX_CONNECTIONS)"
            ));
            continue;
        }
        if !SECTIONS.contains(&path[0].as_str()) {
            let mut msg = format!("{name}: unknown section {}", path[0]);
            match suggest(&path[0], SECTIONS) {
                Some(s) => {
                    let mut fixed = path.clone();
                    fixed[0] = s.to_string();
                    msg.push_str(&format!("; did you mean {}?", env_name(&fixed)));
                }
                None => msg.push_str(&format!(" (known: {})", SECTIONS.join(", "))),
            }
            errors.push(msg);
            continue;
        }
        let Some(value) = value.to_str() else {
            errors.push(format!("{name}: the value is not valid UTF-8"));
            continue;
        };
        keys.push(EnvKey {
            name,
            path,
            value: value.to_string(),
        });
    }
    keys
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `["db", "max_connections"]` → `VPNBOT_DB__MAX_CONNECTIONS`.
fn env_name(path: &[String]) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.iter()
            .map(|s| s.to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(ENV_SPLIT)
    )
}

/// The closest candidate to a mistyped key, if any is close enough.
fn suggest<'a>(typo: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro(typo, c), *c))
        .filter(|(score, _)| *score > SUGGEST_MIN_SIMILARITY)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// What the loader knows while collecting problems.
struct Collector<'a> {
    env: &'a [EnvKey],
    errors: Vec<String>,
    /// Paths of keys that failed and now hold their defaults; value checks naming them are
    /// dropped as noise.
    failed: Vec<Vec<String>>,
}

impl Collector<'_> {
    /// Environment variables that set `path`, a key below it, or a table above it.
    fn env_for(&self, path: &[String]) -> Vec<&EnvKey> {
        self.env
            .iter()
            .filter(|k| k.path.starts_with(path) || path.starts_with(&k.path))
            .collect()
    }

    /// Records one problem at `path`; `suggestion` replaces its last segment in the "did you
    /// mean" (as a variable name when the key came from the environment).
    fn report(&mut self, path: &[String], what: &str, suggestion: Option<&str>) {
        let dotted = path.join(".");
        let fixed = suggestion.map(|s| {
            let mut p = path.to_vec();
            *p.last_mut().expect("error paths are non-empty") = s.to_string();
            p
        });
        let vars = self.env_for(path);
        let msg = if vars.is_empty() {
            let hint = fixed
                .map(|p| format!("; did you mean {}?", p.join(".")))
                .unwrap_or_default();
            format!("{dotted}: {what}{hint}")
        } else {
            let names: Vec<&str> = vars.iter().map(|k| k.name.as_str()).collect();
            let hint = fixed
                .map(|mut p| {
                    // One variable below the bad key: keep its deeper segments in the fix.
                    if let [one] = vars.as_slice() {
                        if one.path.len() > p.len() {
                            p.extend_from_slice(&one.path[p.len()..]);
                        }
                    }
                    format!("; did you mean {}?", env_name(&p))
                })
                .unwrap_or_default();
            format!(
                "environment variable {} ({dotted}): {what}{hint}",
                names.join(", ")
            )
        };
        self.errors.push(msg);
    }

    /// Deserializes one section; on each failure reports it, removes the offending key and
    /// tries again, so every bad key of the section is reported.
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        top: &BTreeMap<String, Value>,
        name: &str,
    ) -> T {
        let Some(mut value) = top.get(name).cloned() else {
            return T::default();
        };
        for _ in 0..MAX_PASSES {
            let e = match value.deserialize::<T>() {
                Ok(v) => return v,
                Err(e) => e,
            };
            let mut path = vec![name.to_string()];
            path.extend(e.path.iter().cloned());
            match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    match suggest(field, expected) {
                        Some(s) => self.report(&path, "unknown key", Some(s)),
                        None if expected.is_empty() => self.report(&path, "unknown key", None),
                        None => self.report(
                            &path,
                            &format!("unknown key (known: {})", expected.join(", ")),
                            None,
                        ),
                    }
                }
                kind => self.report(&path, &kind_without_value(kind), None),
            }
            match remove(&mut value, &e.path) {
                Some(removed) => self.fail(name, &removed),
                None => break,
            }
        }
        self.failed.push(vec![name.to_string()]);
        T::default()
    }

    fn fail(&mut self, section: &str, removed: &[String]) {
        let mut p = vec![section.to_string()];
        p.extend_from_slice(removed);
        self.failed.push(p);
    }
}

/// Removes the key at `path` (figment's error path inside a section). A path that runs into
/// a list removes the key holding the list. Returns the removed key's path, or `None` when
/// nothing could be removed (an error about the section itself).
fn remove(value: &mut Value, path: &[String]) -> Option<Vec<String>> {
    let Value::Dict(_, dict) = value else {
        return None;
    };
    match path {
        [] => None,
        [leaf] => dict.remove(leaf).map(|_| vec![leaf.clone()]),
        [first, rest @ ..] => {
            if let Some(child @ Value::Dict(..)) = dict.get_mut(first) {
                if let Some(mut below) = remove(child, rest) {
                    below.insert(0, first.clone());
                    return Some(below);
                }
            }
            dict.remove(first).map(|_| vec![first.clone()])
        }
    }
}

/// A file that does not parse, as `FILE: TOML parse error at line 2, column 9: invalid basic
/// string`: without the excerpt of the offending line the parser adds, which may hold a secret.
fn parse_error(e: &figment::Error) -> String {
    let text = match &e.kind {
        figment::error::Kind::Message(m) => m
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.contains('|'))
            .collect::<Vec<_>>()
            .join(": "),
        kind => kind_without_value(kind),
    };
    match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
        Some(source) => format!("{source}: {text}"),
        None => text,
    }
}

/// A type or value error without the value itself: the key may hold a secret (an all-digit
/// API key, a token).
fn kind_without_value(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let what = |a: &Actual| match a {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "a value",
    };
    match kind {
        Kind::InvalidType(a, expected) => {
            let expected = if expected.starts_with("struct ") || expected.starts_with("a map") {
                "a table"
            } else {
                expected
            };
            format!("invalid type: found {}, expected {expected}", what(a))
        }
        Kind::InvalidValue(a, expected) => {
            format!("invalid value: found {}, expected {expected}", what(a))
        }
        Kind::InvalidLength(n, expected) => {
            format!("invalid length {n}, expected {expected}")
        }
        Kind::UnknownVariant(_, expected) => {
            format!("unknown variant, expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(f) => format!("missing key {f}"),
        Kind::DuplicateField(f) => format!("duplicate key {f}"),
        Kind::UnsupportedKey(a, _) | Kind::Unsupported(a) => {
            format!("unsupported {}", what(a))
        }
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "integer out of range".into(),
        other => other.to_string(),
    }
}

/// Whether `msg` mentions the key at `path`: its dotted path as a word, or (for a message
/// about the same section) its last segment as a word, as in
/// `reconcile.iteration_timeout_seconds (5) must not exceed interval_seconds (3)`.
fn mentions(msg: &str, path: &[String]) -> bool {
    let dotted = path.join(".");
    if path.len() == 1 {
        return msg.starts_with(&format!("{dotted}.")) || msg.starts_with(&format!("{dotted}:"));
    }
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let found = |needle: &str, allow_dot_before: bool| {
        msg.match_indices(needle).any(|(i, _)| {
            let before = msg[..i].chars().next_back();
            let after = msg[i + needle.len()..].chars().next();
            before.is_none_or(|c| !(is_word(c) || (!allow_dot_before && c == '.')))
                && after.is_none_or(|c| !is_word(c))
        })
    };
    found(&dotted, false)
        || (msg.starts_with(&format!("{}.", path[0]))
            && found(path.last().expect("len >= 2"), false))
}

/// Loads the file at `path` (if any) and the `VPNBOT_*` configuration variables among `vars`;
/// `database_url` fills an empty `db.url`. Returns every problem at once.
pub(super) fn load(
    path: Option<&Path>,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    database_url: Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut fig = Figment::new();
    if let Some(p) = path {
        if !p.exists() {
            return Err(ConfigErrors(vec![format!(
                "config file {} does not exist",
                p.display()
            )]));
        }
        fig = fig.merge(Toml::file(p));
    }
    let env = scan_env(vars, &mut errors);
    fig = fig.merge(EnvProvider(&env));
    from_figment(fig, &env, errors, database_url)
}

/// Loads TOML text only (no environment).
pub(super) fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
    from_figment(Figment::from(Toml::string(text)), &[], Vec::new(), None)
}

fn from_figment(
    fig: Figment,
    env: &[EnvKey],
    errors: Vec<String>,
    database_url: Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut c = Collector {
        env,
        errors,
        failed: Vec::new(),
    };
    let top = match fig.extract::<BTreeMap<String, Value>>() {
        Ok(top) => top,
        Err(e) => {
            // The file does not parse: nothing below would be meaningful.
            c.errors.extend(e.into_iter().map(|e| parse_error(&e)));
            return Err(ConfigErrors(c.errors));
        }
    };
    for key in top.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            let path = [key.clone()];
            match suggest(key, SECTIONS) {
                Some(s) => c.report(&path, "unknown section", Some(s)),
                None => c.report(
                    &path,
                    &format!("unknown section (known: {})", SECTIONS.join(", ")),
                    None,
                ),
            }
        }
    }
    let mut cfg = Config {
        telegram: c.section(&top, "telegram"),
        db: c.section(&top, "db"),
        leader: c.section(&top, "leader"),
        observability: c.section(&top, "observability"),
        runtime: c.section(&top, "runtime"),
        node_client: c.section(&top, "node_client"),
        outbox: c.section(&top, "outbox"),
        diagnostics: c.section(&top, "diagnostics"),
        reconcile: c.section(&top, "reconcile"),
        bot: c.section(&top, "bot"),
        nodes: c.section(&top, "nodes"),
    };
    if cfg.db.url.expose_secret().is_empty() {
        if let Some(url) = database_url {
            cfg.db.url = SecretString::from(url);
        }
    }
    for msg in cfg.validate() {
        // A key that failed to parse holds its default: checks naming it would be noise.
        if c.failed.iter().any(|p| mentions(&msg, p)) {
            continue;
        }
        let from: Vec<&str> = env
            .iter()
            .filter(|k| mentions(&msg, &k.path))
            .map(|k| k.name.as_str())
            .collect();
        if from.is_empty() {
            c.errors.push(msg);
        } else {
            c.errors.push(format!(
                "{msg} (set by environment variable {})",
                from.join(", ")
            ));
        }
    }
    if c.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(c.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn load_env(toml: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let env = scan_env(vars(pairs), &mut errors);
        let fig = Figment::from(Toml::string(toml)).merge(EnvProvider(&env));
        from_figment(fig, &env, errors, None)
    }

    const OK: &str = "[db]\nurl = \"postgres://u@h/d\"\n";

    #[test]
    fn sections_are_the_config_tables() {
        let v = Value::serialize(Config::default()).unwrap();
        let keys: Vec<&str> = v.as_dict().unwrap().keys().map(String::as_str).collect();
        let mut known = SECTIONS.to_vec();
        known.sort_unstable();
        assert_eq!(keys, known);
    }

    #[test]
    fn non_config_names_cannot_be_taken_for_configuration() {
        for name in NON_CONFIG_ENV {
            let mut errors = Vec::new();
            let keys = scan_env(vars(&[(name, "1")]), &mut errors);
            assert!(keys.is_empty() && errors.is_empty(), "{name}: {errors:?}");
        }
        let cfg = load_env(
            OK,
            &[
                ("VPNBOT_CONFIG", "/etc/vpnbot.toml"),
                ("VPNBOT_TEST_PGPORT", "1"),
                ("VPNBOT_TEST_PGDATA", "/tmp/x"),
                ("VPNBOT_SIM_API_KEY", "x"),
                ("VPNBOT_DB__MAX_CONNECTIONS", "7"),
                ("OTHER__THING", "1"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.db.max_connections, 7);
    }

    #[test]
    fn a_typo_a_wrong_type_and_a_negative_timeout_are_all_reported() {
        let errs = from_toml_str(
            "[db]\nurl = \"postgres://u@h/d\"\nmax_conections = 20\nmin_connections = \"two\"\n\
             acquire_timeout_seconds = -1.0\n",
        )
        .unwrap_err()
        .0;
        assert_eq!(
            errs,
            vec![
                "db.acquire_timeout_seconds: invalid value: found a number, expected a number \
                 of seconds from 0 to 1e9",
                "db.max_conections: unknown key; did you mean db.max_connections?",
                "db.min_connections: invalid type: found a string, expected u32",
            ],
        );
    }

    #[test]
    fn every_bad_key_of_every_section_is_reported() {
        let errs = from_toml_str(
            "[db]\nurl = \"postgres://u@h/d\"\nmax_connections = \"x\"\nmin_connections = \"y\"\n\
             [leader]\nlock_kee = 1\n[nodes.a]\nurl = \"http://h/\"\napi_key = \"k\"\nport = 1\n\
             [[bot.plans]]\nid = \"m\"\ntitle_en = \"a\"\ntitle_ru = \"b\"\ndays = \"30\"\nstars = 1\n",
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        for needle in [
            "db.max_connections: invalid type",
            "db.min_connections: invalid type",
            "leader.lock_kee: unknown key; did you mean leader.lock_key?",
            "nodes.a.port: unknown key",
            "bot.plans.0.days: invalid type",
        ] {
            assert!(all.contains(needle), "no {needle:?} in:\n{all}");
        }
        // Both pool sizes fell back to defaults: no check about them is reported.
        assert_eq!(errs.len(), 5, "{all}");
    }

    #[test]
    fn no_doubled_or_escaped_quotes() {
        let errs = from_toml_str("[db]\nqqq = 1\n[telegram]\nadmin_ids = \"x\"\n")
            .unwrap_err()
            .0;
        let all = errs.join("\n");
        assert!(
            !all.contains("``") && !all.contains("\\\"") && !all.contains('"'),
            "{all}"
        );
        assert!(all.contains("db.qqq: unknown key (known: url, "), "{all}");
    }

    #[test]
    fn problems_from_the_environment_name_the_variable() {
        let errs = load_env(
            OK,
            &[
                ("VPNBOT_DB__MAX_CONECTIONS", "3"),
                ("VPNBOT_DB__MIN_CONNECTIONS", "pw-s3cret"),
                ("VPNBOT_OBSERVABILITY__LOG_FORMAT", "xml"),
                ("VPNBOT_DB_URL", "postgres://x/y"),
                ("VPNBOT_DBB__URL", "postgres://x/y"),
                ("VPNBOT_DB____URL", "postgres://x/y"),
            ],
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        for needle in [
            "VPNBOT_DBB__URL: unknown section dbb; did you mean VPNBOT_DB__URL?",
            "VPNBOT_DB_URL: not a configuration variable",
            "did you mean VPNBOT_DB__URL?",
            "VPNBOT_DB____URL: empty key segment",
            "environment variable VPNBOT_DB__MAX_CONECTIONS (db.max_conections): unknown key; \
             did you mean VPNBOT_DB__MAX_CONNECTIONS?",
            "environment variable VPNBOT_DB__MIN_CONNECTIONS (db.min_connections): invalid type",
            "environment variable VPNBOT_OBSERVABILITY__LOG_FORMAT (observability.log_format): \
             unknown variant, expected one of: human, json",
        ] {
            assert!(all.contains(needle), "no {needle:?} in:\n{all}");
        }
        assert!(!all.contains("s3cret"), "{all}");
        assert_eq!(errs.len(), 6, "{all}");
    }

    #[test]
    fn a_nested_variable_gets_its_fix_at_every_level() {
        let errs = load_env(
            OK,
            &[
                ("VPNBOT_NODES__A__URLL", "http://h/"),
                ("VPNBOT_DB__MAX_CONECTIONS__X", "1"),
            ],
        )
        .unwrap_err()
        .0;
        let all = errs.join("\n");
        for needle in [
            "environment variable VPNBOT_NODES__A__URLL (nodes.a.urll): unknown key; did you \
             mean VPNBOT_NODES__A__URL?",
            "environment variable VPNBOT_DB__MAX_CONECTIONS__X (db.max_conections): unknown \
             key; did you mean VPNBOT_DB__MAX_CONNECTIONS__X?",
        ] {
            assert!(all.contains(needle), "no {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn keys_keep_their_case_in_messages() {
        let errs = from_toml_str(&format!(
            "{OK}[nodes.Alpha]\nurl = \"http://h/\"\napi_key = \"k\"\nApi_Key2 = 1\n"
        ))
        .unwrap_err()
        .0;
        assert_eq!(
            errs,
            vec!["nodes.Alpha.Api_Key2: unknown key; did you mean nodes.Alpha.api_key?"]
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_one_line_without_its_content() {
        let errs = from_toml_str("[telegram]\ntoken = \"123:s3cret\n")
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("TOML parse error at line 2"), "{errs:?}");
        assert!(
            !errs[0].contains("s3cret") && !errs[0].contains('\n'),
            "{errs:?}"
        );
    }

    #[test]
    fn a_scalar_where_a_table_belongs() {
        let errs = from_toml_str(&format!("leader = 3\n{OK}")).unwrap_err().0;
        assert_eq!(
            errs,
            vec!["leader: invalid type: found an integer, expected a table"]
        );
    }

    #[test]
    fn a_value_check_names_the_variable_that_set_it() {
        let errs = load_env(
            OK,
            &[
                ("VPNBOT_RECONCILE__INTERVAL_SECONDS", "5"),
                ("VPNBOT_RECONCILE__ITERATION_TIMEOUT_SECONDS", "50"),
            ],
        )
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].ends_with(
                "(set by environment variable VPNBOT_RECONCILE__INTERVAL_SECONDS, \
                 VPNBOT_RECONCILE__ITERATION_TIMEOUT_SECONDS)"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        assert_eq!(
            suggest("max_conections", &["url", "max_connections"]),
            Some("max_connections")
        );
        assert_eq!(suggest("tyop", SECTIONS), None);
        assert_eq!(suggest("nodse", SECTIONS), Some("nodes"));
    }

    #[test]
    fn mentions_matches_whole_keys_only() {
        let p = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        let m = "reconcile.iteration_timeout_seconds (5) must not exceed interval_seconds (3)";
        assert!(mentions(m, &p("reconcile.interval_seconds")));
        assert!(mentions(m, &p("reconcile.iteration_timeout_seconds")));
        assert!(!mentions(m, &p("reconcile.grace_seconds")));
        assert!(!mentions(m, &p("leader.interval_seconds")));
        assert!(!mentions(
            "leader.check_interval_seconds must be",
            &p("leader.interval_seconds")
        ));
        assert!(mentions(
            "nodes.a.url must be an http(s) URL",
            &p("nodes.a")
        ));
        assert!(!mentions(
            "nodes.ab.url must be an http(s) URL",
            &p("nodes.a")
        ));
        assert!(mentions("db.url is empty", &p("db")));
    }
}
