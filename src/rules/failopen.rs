//! Fail-open rules: what a write or key-less command gets while its upstream is down.

use serde::{Deserialize, Serialize};

use super::glob::{Glob, compile_glob};
use super::{DEFAULT_RULE, PING_RULE};
use crate::resp::value::ReplyValue;

/// `+PONG`, for `PING` answered locally.
static PONG: ReplyValue = ReplyValue::from_static("+PONG", b"+PONG\r\n", b"+PONG\r\n", false);

// ---------------------------------------------------------------------------------------
// Configuration (TOML)
// ---------------------------------------------------------------------------------------

/// `[fail_open]`: how writes and key-less commands are answered while the upstream is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailOpenConfig {
    /// Ordered; the first matching rule decides.
    pub rules: Vec<RuleConfig>,
    /// Answer `PING` with `+PONG` before any rule is consulted.
    pub ping_locally: bool,
    /// Error text (without the leading `-`) for commands no rule matches; unset, the error
    /// names the upstream and why it cannot answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_error: Option<String>,
}

impl Default for FailOpenConfig {
    fn default() -> Self {
        FailOpenConfig {
            rules: Vec::new(),
            ping_locally: true,
            default_error: None,
        }
    }
}

/// One `[[fail_open.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Shown in logs and metrics; defaults to `rules[<index>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Command names (case-insensitive) or classes: `@write`, `@read`, `@all`.
    pub commands: Vec<String>,
    /// Key globs. Empty matches any key and also key-less commands; otherwise every key of
    /// the command must match at least one glob, and key-less commands never match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    pub action: ActionKind,
    /// The reply for `reply` and `queue` rules, in [`ReplyValue::parse`] syntax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The error text (without the leading `-`) for `error` rules; defaults to
    /// `default_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Answer with `reply`; the write is lost.
    Reply,
    /// Answer with an error.
    Error,
    /// Answer with `reply` and journal the write for replay once the upstream is back.
    Queue,
}

/// What to do with a command while its upstream is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Send `value`; do not journal.
    Reply {
        rule: &'a str,
        value: &'a ReplyValue,
    },
    /// Journal the write for replay, then send `value`.
    Queue {
        rule: &'a str,
        value: &'a ReplyValue,
    },
    /// Send `-{message}\r\n`; with no message, an error naming the upstream and why it
    /// cannot answer. `rule` is `"default"` when no rule matched.
    Error {
        rule: &'a str,
        message: Option<&'a str>,
    },
}

impl<'a> Decision<'a> {}

/// Compiled `[fail_open]` rules.
#[derive(Debug, Clone)]
pub struct FailOpen {
    rules: Vec<Rule>,
    ping_locally: bool,
    default_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    commands: CommandSet,
    /// Empty: any keys, and key-less commands.
    keys: Vec<Glob>,
    action: Action,
}

#[derive(Debug, Clone, Default)]
struct CommandSet {
    /// Lowercase command names.
    names: Vec<Box<str>>,
    writes: bool,
    reads: bool,
    all: bool,
}

#[derive(Debug, Clone)]
enum Action {
    Reply(ReplyValue),
    Queue(ReplyValue),
    Error(Option<String>),
}

impl Rule {
    fn matches(&self, name: &str, is_write: bool, is_read: bool, keys: &[&[u8]]) -> bool {
        let c = &self.commands;
        let command = c.all
            || (c.writes && is_write)
            || (c.reads && is_read)
            || c.names.iter().any(|n| n.eq_ignore_ascii_case(name));
        command
            && (self.keys.is_empty()
                || (!keys.is_empty()
                    && keys
                        .iter()
                        .all(|key| self.keys.iter().any(|glob| glob.matches(key)))))
    }

    fn is_catch_all(&self) -> bool {
        self.commands.all && self.keys.is_empty()
    }
}

impl FailOpen {
    /// Validates and compiles the rules. Command names are not checked against the
    /// command table; see [`FailOpen::compile_checked`].
    #[cfg(test)]
    pub fn compile(cfg: &FailOpenConfig) -> Result<FailOpen, String> {
        FailOpen::compile_checked(cfg, |_| true)
    }

    /// Like [`FailOpen::compile`], and rejects command names for which `known_command`
    /// (given the lowercase name) returns false, so a misspelt command is caught at
    /// startup rather than silently never matching during an outage.
    pub fn compile_checked(
        cfg: &FailOpenConfig,
        known_command: impl Fn(&str) -> bool,
    ) -> Result<FailOpen, String> {
        if let Some(text) = &cfg.default_error {
            validate_error_text(text).map_err(|e| format!("fail_open.default_error: {e}"))?;
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(cfg.rules.len());
        for (i, rc) in cfg.rules.iter().enumerate() {
            let at = format!("fail_open.rules[{i}]");
            if let Some(j) = rules.iter().position(Rule::is_catch_all) {
                return Err(format!(
                    "{at}: unreachable because fail_open.rules[{j}] (\"{}\") matches every \
                     command; move catch-all rules last",
                    rules[j].name
                ));
            }
            let name = match &rc.name {
                None => format!("rules[{i}]"),
                Some(n) if n.trim().is_empty() => return Err(format!("{at}.name: empty")),
                // Reserved so that a metrics label always means one thing.
                Some(n) if n == DEFAULT_RULE || n == PING_RULE || n.starts_with("rules[") => {
                    return Err(format!("{at}.name: \"{n}\" is reserved"));
                }
                Some(n) if rules.iter().any(|r| r.name == *n) => {
                    return Err(format!("{at}.name: duplicate rule name \"{n}\""));
                }
                Some(n) => n.clone(),
            };
            let commands = compile_commands(cfg, rc, &at, &known_command)?;
            let keys = rc
                .keys
                .iter()
                .enumerate()
                .map(|(k, glob)| compile_glob(glob, &format!("{at}.keys[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let action = compile_action(cfg, rc, &at, &commands)?;
            rules.push(Rule {
                name,
                commands,
                keys,
                action,
            });
        }
        Ok(FailOpen {
            rules,
            ping_locally: cfg.ping_locally,
            default_error: cfg.default_error.clone(),
        })
    }

    /// The first rule matching the command.
    ///
    /// `name` is the canonical command name (matched case-insensitively), `is_write` /
    /// `is_read` its class, `keys` its key arguments (empty for key-less commands). `PING`
    /// gets `+PONG` when `ping_locally` is set; for `PING message` the caller should echo
    /// the message instead, as only it sees the arguments.
    pub fn decide(
        &self,
        name: &str,
        is_write: bool,
        is_read: bool,
        keys: &[&[u8]],
    ) -> Decision<'_> {
        if self.ping_locally && name.eq_ignore_ascii_case("ping") {
            return Decision::Reply {
                rule: PING_RULE,
                value: &PONG,
            };
        }
        // Linear on purpose: a handful of rules, consulted only while an upstream is down.
        for rule in &self.rules {
            if rule.matches(name, is_write, is_read, keys) {
                return match &rule.action {
                    Action::Reply(value) => Decision::Reply {
                        rule: &rule.name,
                        value,
                    },
                    Action::Queue(value) => Decision::Queue {
                        rule: &rule.name,
                        value,
                    },
                    Action::Error(message) => Decision::Error {
                        rule: &rule.name,
                        message: message.as_deref(),
                    },
                };
            }
        }
        Decision::Error {
            rule: DEFAULT_RULE,
            message: self.default_error.as_deref(),
        }
    }

    /// Every name [`Decision::rule`] can return, for registering metric labels up front.
    #[cfg(test)]
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        let ping = self.ping_locally.then_some(PING_RULE);
        ping.into_iter()
            .chain(self.rules.iter().map(|r| r.name.as_str()))
            .chain(std::iter::once(DEFAULT_RULE))
    }

    pub fn ping_locally(&self) -> bool {
        self.ping_locally
    }
}

impl Default for FailOpen {
    /// No rules: `PING` answered locally, everything else the default error.
    fn default() -> Self {
        FailOpen {
            rules: Vec::new(),
            ping_locally: true,
            default_error: None,
        }
    }
}

fn compile_commands(
    cfg: &FailOpenConfig,
    rc: &RuleConfig,
    at: &str,
    known_command: impl Fn(&str) -> bool,
) -> Result<CommandSet, String> {
    if rc.commands.is_empty() {
        return Err(format!(
            "{at}.commands: empty; list command names or classes (\"@write\", \"@read\", \
             \"@all\")"
        ));
    }
    let mut set = CommandSet::default();
    for (k, command) in rc.commands.iter().enumerate() {
        let field = format!("{at}.commands[{k}]");
        if let Some(class) = command.strip_prefix('@') {
            match class.to_ascii_lowercase().as_str() {
                "write" => set.writes = true,
                "read" => set.reads = true,
                "all" => set.all = true,
                _ => {
                    return Err(format!(
                        "{field}: unknown class \"{command}\"; expected \"@write\", \"@read\" \
                         or \"@all\""
                    ));
                }
            }
            continue;
        }
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{field}: invalid command name {command:?}"));
        }
        let lower = command.to_ascii_lowercase();
        if !known_command(&lower) {
            return Err(format!("{field}: unknown command \"{command}\""));
        }
        if cfg.ping_locally && lower == "ping" {
            return Err(format!(
                "{field}: PING is answered locally while fail_open.ping_locally = true; \
                 remove it here or set ping_locally = false"
            ));
        }
        set.names.push(lower.into_boxed_str());
    }
    Ok(set)
}

fn compile_action(
    cfg: &FailOpenConfig,
    rc: &RuleConfig,
    at: &str,
    commands: &CommandSet,
) -> Result<Action, String> {
    let kind = match rc.action {
        ActionKind::Reply => "reply",
        ActionKind::Queue => "queue",
        ActionKind::Error => {
            if rc.reply.is_some() {
                return Err(format!(
                    "{at}.reply: not used with action = \"error\"; set message instead"
                ));
            }
            let message = rc.message.as_ref().or(cfg.default_error.as_ref());
            if let Some(m) = message {
                validate_error_text(m).map_err(|e| format!("{at}.message: {e}"))?;
            }
            return Ok(Action::Error(message.cloned()));
        }
    };
    if rc.message.is_some() {
        return Err(format!(
            "{at}.message: only used with action = \"error\"; action = \"{kind}\" answers \
             with reply"
        ));
    }
    let Some(text) = &rc.reply else {
        return Err(format!(
            "{at}.reply: required with action = \"{kind}\" (e.g. reply = \"+OK\", or \":1\" \
             for commands that return an integer)"
        ));
    };
    let value = ReplyValue::parse(text).map_err(|e| format!("{at}.reply: {e}"))?;
    if rc.action == ActionKind::Reply {
        return Ok(Action::Reply(value));
    }
    if value.is_error() {
        // The client would retry a write the journal is going to replay anyway, applying
        // it twice.
        return Err(format!(
            "{at}.reply: a queued write must not reply with an error; use e.g. \"+OK\""
        ));
    }
    if commands.reads || commands.all {
        return Err(format!(
            "{at}.commands: queue rules journal writes; \"@read\" and \"@all\" are not allowed"
        ));
    }
    Ok(Action::Queue(value))
}

/// An error text is sent as `-{text}\r\n`, so it must be one non-empty line, and the
/// prefix is ours to add.
fn validate_error_text(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("empty error message".into());
    }
    if text.contains(['\r', '\n']) {
        return Err("error message must be a single line (no \\r or \\n)".into());
    }
    if text.starts_with('-') {
        return Err(format!(
            "error message {text:?} must not start with '-' (it is added); write e.g. \
             \"ERR ...\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        commands: &[&str],
        keys: &[&str],
        action: ActionKind,
        reply: Option<&str>,
    ) -> RuleConfig {
        RuleConfig {
            name: None,
            commands: commands.iter().map(|s| s.to_string()).collect(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            action,
            reply: reply.map(str::to_owned),
            message: None,
        }
    }

    fn fail_open(rules: Vec<RuleConfig>) -> FailOpen {
        FailOpen::compile(&FailOpenConfig {
            rules,
            ..FailOpenConfig::default()
        })
        .unwrap()
    }

    fn reply_of(d: Decision<'_>) -> (&str, &str) {
        match d {
            Decision::Reply { rule, value } => (rule, value.as_str()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let f = fail_open(vec![
            rule(&["INCR"], &["ratelimit:*"], ActionKind::Reply, Some(":1")),
            rule(&["incr"], &[], ActionKind::Reply, Some(":0")),
            rule(
                &["@write"],
                &["ratelimit:*"],
                ActionKind::Reply,
                Some("+OK"),
            ),
        ]);
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"ratelimit:u1"])),
            ("rules[0]", ":1")
        );
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"other"])),
            ("rules[1]", ":0")
        );
        assert_eq!(
            reply_of(f.decide("set", true, false, &[b"ratelimit:u1"])),
            ("rules[2]", "+OK")
        );
        // Reordered, the broad rule shadows the specific one.
        let f = fail_open(vec![
            rule(&["incr"], &[], ActionKind::Reply, Some(":0")),
            rule(&["INCR"], &["ratelimit:*"], ActionKind::Reply, Some(":1")),
        ]);
        assert_eq!(
            reply_of(f.decide("incr", true, false, &[b"ratelimit:u1"])),
            ("rules[0]", ":0")
        );
    }

    #[test]
    fn command_classes() {
        let f = fail_open(vec![
            rule(&["@write"], &[], ActionKind::Reply, Some("+OK")),
            rule(&["@read"], &[], ActionKind::Reply, Some("nil")),
        ]);
        assert_eq!(
            reply_of(f.decide("set", true, false, &[b"k"])).0,
            "rules[0]"
        );
        assert_eq!(
            reply_of(f.decide("get", false, true, &[b"k"])).0,
            "rules[1]"
        );
        // Neither class: falls through to the default.
        assert!(matches!(
            f.decide("client", false, false, &[]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
        let f = fail_open(vec![rule(&["@ALL"], &[], ActionKind::Reply, Some("+OK"))]);
        assert_eq!(
            reply_of(f.decide("client", false, false, &[])).0,
            "rules[0]"
        );
    }

    #[test]
    fn key_globs_must_match_every_key() {
        let f = fail_open(vec![rule(
            &["del", "mset"],
            &["session:*", "tmp:*"],
            ActionKind::Reply,
            Some(":0"),
        )]);
        assert_eq!(
            reply_of(f.decide("del", true, false, &[b"session:1", b"tmp:2", b"session:3"])).0,
            "rules[0]"
        );
        assert!(matches!(
            f.decide("del", true, false, &[b"session:1", b"user:2"]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
    }

    #[test]
    fn keyless_commands_match_only_rules_without_keys() {
        let f = fail_open(vec![
            rule(&["@write"], &["*"], ActionKind::Reply, Some("+OK")),
            rule(
                &["flushall", "publish"],
                &[],
                ActionKind::Reply,
                Some("+OK"),
            ),
        ]);
        // `keys = ["*"]` still needs a key.
        assert!(matches!(
            f.decide("flushdb", true, false, &[]),
            Decision::Error {
                rule: "default",
                ..
            }
        ));
        assert_eq!(
            reply_of(f.decide("flushall", true, false, &[])).0,
            "rules[1]"
        );
        assert_eq!(reply_of(f.decide("set", true, false, &[b""])).0, "rules[0]");
    }

    #[test]
    fn unmatched_gets_default_error_and_ping_is_local() {
        let f = fail_open(vec![]);
        assert_eq!(
            f.decide("set", true, false, &[b"k"]),
            Decision::Error {
                rule: "default",
                message: None
            }
        );
        let d = f.decide("PING", false, false, &[]);
        assert_eq!(reply_of(d), ("ping_locally", "+PONG"));
        if let Decision::Reply { value, .. } = d {
            assert_eq!(&value.encode(crate::resp::Proto::Resp3)[..], b"+PONG\r\n");
        }
        let f = FailOpen::compile(&FailOpenConfig {
            ping_locally: false,
            default_error: Some("ERR down".into()),
            ..FailOpenConfig::default()
        })
        .unwrap();
        assert_eq!(
            f.decide("ping", false, false, &[]),
            Decision::Error {
                rule: "default",
                message: Some("ERR down")
            }
        );
        assert_eq!(f.rule_names().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn error_and_queue_actions() {
        let mut err = rule(&["del"], &[], ActionKind::Error, None);
        err.message = Some("ERR deletes disabled".into());
        let named_err = RuleConfig {
            name: Some("no-flush".into()),
            ..rule(&["flushall"], &[], ActionKind::Error, None)
        };
        let queue = rule(&["incr"], &["counter:*"], ActionKind::Queue, Some(":0"));
        let f = fail_open(vec![err, named_err, queue]);
        assert_eq!(
            f.decide("del", true, false, &[b"x"]),
            Decision::Error {
                rule: "rules[0]",
                message: Some("ERR deletes disabled")
            }
        );
        assert_eq!(
            f.decide("flushall", true, false, &[]),
            Decision::Error {
                rule: "no-flush",
                message: None
            }
        );
        match f.decide("incr", true, false, &[b"counter:views"]) {
            Decision::Queue { rule, value } => {
                assert_eq!(rule, "rules[2]");
                assert_eq!(&value.encode(crate::resp::Proto::Resp2)[..], b":0\r\n");
            }
            other => panic!("expected queue, got {other:?}"),
        }
        assert_eq!(
            f.rule_names().collect::<Vec<_>>(),
            [
                "ping_locally",
                "rules[0]",
                "no-flush",
                "rules[2]",
                "default"
            ]
        );
    }

    fn compile_err(rules: Vec<RuleConfig>) -> String {
        FailOpen::compile(&FailOpenConfig {
            rules,
            ..FailOpenConfig::default()
        })
        .unwrap_err()
    }

    #[test]
    fn rule_validation_names_the_field() {
        let ok = rule(&["set"], &[], ActionKind::Reply, Some("+OK"));
        let err = compile_err(vec![
            ok.clone(),
            ok.clone(),
            rule(&["incr"], &[], ActionKind::Queue, None),
        ]);
        assert!(
            err.starts_with("fail_open.rules[2].reply: required"),
            "{err}"
        );
        assert!(err.contains("+OK"), "{err}");

        let err = compile_err(vec![rule(&["set"], &[], ActionKind::Reply, None)]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: required"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["incr"], &[], ActionKind::Reply, Some(":x"))]);
        assert!(
            err.starts_with(
                "fail_open.rules[0].reply: invalid reply \":x\": not a valid RESP value"
            ),
            "{err}"
        );

        let err = compile_err(vec![rule(
            &["incr"],
            &[],
            ActionKind::Queue,
            Some("-ERR no"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: a queued write"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["@read"], &[], ActionKind::Queue, Some("+OK"))]);
        assert!(err.starts_with("fail_open.rules[0].commands"), "{err}");

        let err = compile_err(vec![rule(&["del"], &[], ActionKind::Error, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].reply: not used"),
            "{err}"
        );

        let mut with_message = ok.clone();
        with_message.message = Some("ERR x".into());
        let err = compile_err(vec![with_message]);
        assert!(err.starts_with("fail_open.rules[0].message"), "{err}");

        let mut bad_message = rule(&["del"], &[], ActionKind::Error, None);
        bad_message.message = Some("-ERR x".into());
        let err = compile_err(vec![bad_message]);
        assert!(err.starts_with("fail_open.rules[0].message"), "{err}");

        let err = compile_err(vec![rule(&[], &[], ActionKind::Reply, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].commands: empty"),
            "{err}"
        );

        let err = compile_err(vec![rule(
            &["set", "@writes"],
            &[],
            ActionKind::Reply,
            Some("+OK"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].commands[1]: unknown class"),
            "{err}"
        );

        let err = compile_err(vec![rule(&["ping"], &[], ActionKind::Reply, Some("+OK"))]);
        assert!(
            err.starts_with("fail_open.rules[0].commands[0]: PING"),
            "{err}"
        );

        let err = compile_err(vec![rule(
            &["set"],
            &["a:*", ""],
            ActionKind::Reply,
            Some("+OK"),
        )]);
        assert!(
            err.starts_with("fail_open.rules[0].keys[1]: empty"),
            "{err}"
        );

        let err = compile_err(vec![
            rule(&["@all"], &[], ActionKind::Error, None),
            ok.clone(),
        ]);
        assert!(err.starts_with("fail_open.rules[1]: unreachable"), "{err}");

        let named = RuleConfig {
            name: Some("x".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![named.clone(), named]);
        assert!(
            err.starts_with("fail_open.rules[1].name: duplicate"),
            "{err}"
        );

        let reserved = RuleConfig {
            name: Some("default".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![reserved]);
        assert!(err.starts_with("fail_open.rules[0].name"), "{err}");
        let generated = RuleConfig {
            name: Some("rules[1]".into()),
            ..ok.clone()
        };
        let err = compile_err(vec![generated, ok.clone()]);
        assert!(err.starts_with("fail_open.rules[0].name"), "{err}");

        let err = FailOpen::compile(&FailOpenConfig {
            default_error: Some("oops\r\n".into()),
            ..FailOpenConfig::default()
        })
        .unwrap_err();
        assert!(err.starts_with("fail_open.default_error"), "{err}");

        let err = FailOpen::compile_checked(
            &FailOpenConfig {
                rules: vec![rule(&["set", "INCRR"], &[], ActionKind::Reply, Some("+OK"))],
                ..FailOpenConfig::default()
            },
            |name| matches!(name, "set" | "incr"),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "fail_open.rules[0].commands[1]: unknown command \"INCRR\""
        );
    }
}
