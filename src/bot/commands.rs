//! The closed sets the bot matches on: its commands (teloxide's `BotCommands` derive: the menu
//! registered with `setMyCommands` and the parser come from one enum) and the actions of its
//! inline buttons (callback data parsed once into [`Callback`]; anything else is a
//! [`CallbackError`], counted as `vpnbot_bot_errors_total{kind="unknown_callback"}`).

use teloxide::types::BotCommand;
use teloxide::utils::command::BotCommands;

/// Longest message text looked at; anything longer is not a command.
pub const MAX_COMMAND_TEXT: usize = 256;
/// Longest callback data Telegram sends (bytes); longer is not ours.
pub const MAX_CALLBACK_DATA: usize = 64;
/// Prefix of a plan button's callback data: `plan:<plan id>`.
const PLAN_PREFIX: &str = "plan:";

/// Every command the bot answers. User commands form the `setMyCommands` menu; admin commands
/// are hidden from it and answered only for `telegram.admin_ids`.
// The doc comment of a user command is its English menu description (the derive reads it).
#[derive(BotCommands, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[command(rename_rule = "lowercase")]
pub enum Command {
    /// Main menu
    #[command(alias = "menu", hide_aliases)]
    Start,
    /// Free trial
    Trial,
    /// Plans and payment
    #[command(aliases = ["renew", "plans"], hide_aliases)]
    Buy,
    /// My subscription
    Status,
    /// My key and QR code
    Key,
    /// Help
    Help,
    /// Admin: counts and revenue.
    #[command(hide)]
    Stats,
    /// Admin: the diagnostics summary.
    #[command(hide)]
    Diag,
    /// Admin: `/reconcile [node] [dry]`.
    #[command(hide)]
    Reconcile,
    /// Admin: `/refund <charge id> [user id]`.
    #[command(hide)]
    Refund,
}

impl Command {
    /// Every command, in menu order.
    pub const ALL: &'static [Command] = &[
        Command::Start,
        Command::Trial,
        Command::Buy,
        Command::Status,
        Command::Key,
        Command::Help,
        Command::Stats,
        Command::Diag,
        Command::Reconcile,
        Command::Refund,
    ];

    /// The command's name (without `/`); also its handler label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Trial => "trial",
            Command::Buy => "buy",
            Command::Status => "status",
            Command::Key => "key",
            Command::Help => "help",
            Command::Stats => "stats",
            Command::Diag => "diag",
            Command::Reconcile => "reconcile",
            Command::Refund => "refund",
        }
    }

    /// Only for `telegram.admin_ids`; to anyone else the command does not exist.
    pub const fn is_admin(self) -> bool {
        matches!(
            self,
            Command::Stats | Command::Diag | Command::Reconcile | Command::Refund
        )
    }

    /// The menu description in Russian (the English one is the derive's `description`).
    const fn description_ru(self) -> &'static str {
        match self {
            Command::Start => "Главное меню",
            Command::Trial => "Пробный период",
            Command::Buy => "Тарифы и оплата",
            Command::Status => "Моя подписка",
            Command::Key => "Мой ключ и QR-код",
            Command::Help => "Помощь",
            Command::Stats | Command::Diag | Command::Reconcile | Command::Refund => "",
        }
    }

    /// The `setMyCommands` menu: the user commands, in English or Russian.
    pub fn menu(ru: bool) -> Vec<BotCommand> {
        let mut menu = Command::bot_commands();
        for c in &mut menu {
            // setMyCommands takes the name without the prefix.
            c.command = c.command.trim_start_matches('/').to_string();
            if ru {
                if let Some(cmd) = Command::ALL.iter().find(|k| c.command == k.as_str()) {
                    c.description = cmd.description_ru().to_string();
                }
            }
        }
        menu
    }

    /// Parses `/name@bot arg...`: the name case-insensitively, any bot name after `@`, at most
    /// four arguments. `None` for text that is no command at all (no `/`, too long);
    /// `Some(Err(()))` for a command the bot does not know.
    pub fn parse_text(text: &str) -> Option<(Result<Command, ()>, Vec<&str>)> {
        if text.len() > MAX_COMMAND_TEXT || !text.starts_with('/') {
            return None;
        }
        let mut parts = text.split_whitespace();
        let head = parts.next()?.trim_start_matches('/');
        let name = head.split('@').next().unwrap_or("").to_ascii_lowercase();
        if name.is_empty() || name.len() > 32 {
            return None;
        }
        let cmd = <Command as BotCommands>::parse(&format!("/{name}"), "").map_err(drop);
        Some((cmd, parts.take(4).collect()))
    }
}

/// What an inline button asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallbackAction {
    /// Start the trial.
    Trial,
    /// Show the plans.
    Buy,
    /// Show the subscription.
    Status,
    /// Send the key.
    Key,
    /// Show the help.
    Help,
    /// Show the main menu.
    Menu,
    /// Send the invoice of one plan (`plan:<id>`).
    Plan,
}

impl CallbackAction {
    /// Every action.
    pub const ALL: &'static [CallbackAction] = &[
        CallbackAction::Trial,
        CallbackAction::Buy,
        CallbackAction::Status,
        CallbackAction::Key,
        CallbackAction::Help,
        CallbackAction::Menu,
        CallbackAction::Plan,
    ];

    /// The callback data of the action (the prefix for [`CallbackAction::Plan`]).
    pub const fn as_str(self) -> &'static str {
        match self {
            CallbackAction::Trial => "trial",
            CallbackAction::Buy => "buy",
            CallbackAction::Status => "status",
            CallbackAction::Key => "key",
            CallbackAction::Help => "help",
            CallbackAction::Menu => "menu",
            CallbackAction::Plan => "plan",
        }
    }
}

/// Parsed callback data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    /// The action.
    pub action: CallbackAction,
    /// The plan id of a [`CallbackAction::Plan`] (checked against the configured plans by the
    /// caller); empty otherwise.
    pub plan: String,
}

/// Callback data the bot did not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// Longer than Telegram allows.
    #[error("callback data of {0} bytes (more than 64)")]
    TooLong(usize),
    /// No such action.
    #[error("unknown callback action")]
    Unknown,
    /// A plan button with an empty plan id.
    #[error("plan button without a plan id")]
    NoPlan,
    /// A plan button for a plan that is not configured (any more).
    #[error("plan button for an unknown plan")]
    UnknownPlan,
    /// A button pressed outside the user's private chat with the bot.
    #[error("button outside the user's own private chat")]
    ForeignChat,
}

impl Callback {
    /// A button without an argument.
    pub fn action(action: CallbackAction) -> Callback {
        Callback {
            action,
            plan: String::new(),
        }
    }

    /// A plan button.
    pub fn plan(id: &str) -> Callback {
        Callback {
            action: CallbackAction::Plan,
            plan: id.to_string(),
        }
    }

    /// The callback data to put on the button.
    pub fn data(&self) -> String {
        match self.action {
            CallbackAction::Plan => format!("{PLAN_PREFIX}{}", self.plan),
            a => a.as_str().to_string(),
        }
    }

    /// Parses callback data.
    ///
    /// # Errors
    /// [`CallbackError`] for data the bot did not send (never a panic).
    pub fn parse(data: &str) -> Result<Callback, CallbackError> {
        if data.len() > MAX_CALLBACK_DATA {
            return Err(CallbackError::TooLong(data.len()));
        }
        if let Some(id) = data.strip_prefix(PLAN_PREFIX) {
            return if id.is_empty() {
                Err(CallbackError::NoPlan)
            } else {
                Ok(Callback::plan(id))
            };
        }
        CallbackAction::ALL
            .iter()
            .find(|a| **a != CallbackAction::Plan && a.as_str() == data)
            .map(|a| Callback::action(*a))
            .ok_or(CallbackError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_strictly() {
        let (c, args) = Command::parse_text("/START@vpn_bot x y").unwrap();
        assert_eq!((c, args), (Ok(Command::Start), vec!["x", "y"]));
        assert_eq!(Command::parse_text("/menu").unwrap().0, Ok(Command::Start));
        assert_eq!(Command::parse_text("/plans").unwrap().0, Ok(Command::Buy));
        assert_eq!(Command::parse_text("/nonsense").unwrap().0, Err(()));
        assert!(Command::parse_text("start").is_none());
        assert!(Command::parse_text("/").is_none());
        assert!(Command::parse_text(&format!("/{}", "a".repeat(300))).is_none());
        assert_eq!(Command::parse_text("/\u{0}\u{1}binary").unwrap().0, Err(()));
        for c in Command::ALL {
            let text = format!("/{}", c.as_str());
            assert_eq!(Command::parse_text(&text).unwrap().0, Ok(*c));
        }
    }

    #[test]
    fn the_menu_lists_user_commands_only_in_both_languages() {
        let en = Command::menu(false);
        let ru = Command::menu(true);
        let names: Vec<_> = en.iter().map(|c| c.command.as_str()).collect();
        assert_eq!(names, ["start", "trial", "buy", "status", "key", "help"]);
        assert_eq!(en[0].description, "Main menu");
        assert_eq!(ru[0].description, "Главное меню");
        assert!(ru.iter().all(|c| !c.description.is_empty()));
    }

    #[test]
    fn callback_data_round_trips_and_foreign_data_is_an_error() {
        for a in CallbackAction::ALL {
            let cb = if *a == CallbackAction::Plan {
                Callback::plan("month")
            } else {
                Callback::action(*a)
            };
            assert_eq!(Callback::parse(&cb.data()), Ok(cb));
        }
        assert_eq!(Callback::parse("nope"), Err(CallbackError::Unknown));
        assert_eq!(Callback::parse("plan:"), Err(CallbackError::NoPlan));
        assert_eq!(Callback::parse(""), Err(CallbackError::Unknown));
        assert_eq!(
            Callback::parse(&"x".repeat(65)),
            Err(CallbackError::TooLong(65))
        );
    }
}
