//! Every text the bot sends, in English and Russian. The language follows the user's Telegram
//! `language_code`: Russian for `ru*` (and the closest neighbours `uk`, `be`, `kk`), English
//! otherwise.

use chrono::{DateTime, Utc};

use super::settings::Plan;

/// A language the bot speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English (the default).
    En,
    /// Russian.
    Ru,
}

impl Lang {
    /// The language for a Telegram `language_code` (`None` or unknown: English).
    pub fn from_code(code: Option<&str>) -> Lang {
        let c = code.unwrap_or("").to_ascii_lowercase();
        let primary = c.split(['-', '_']).next().unwrap_or("");
        match primary {
            "ru" | "uk" | "be" | "kk" => Lang::Ru,
            _ => Lang::En,
        }
    }

    /// The code stored in `bot_users.language_code`.
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Ru => "ru",
        }
    }
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A plan's title in `lang`.
pub fn plan_title(lang: Lang, p: &Plan) -> &str {
    match lang {
        Lang::En => &p.title_en,
        Lang::Ru => &p.title_ru,
    }
}

macro_rules! texts {
    ($($(#[$m:meta])* $name:ident => $en:expr, $ru:expr;)*) => {
        $( $(#[$m])* pub fn $name(lang: Lang) -> &'static str {
            match lang { Lang::En => $en, Lang::Ru => $ru }
        } )*
    };
}

texts! {
    /// Greeting under the main menu.
    welcome => "Welcome! This bot sells fast VLESS VPN access, paid with Telegram Stars.\nChoose an action below.",
        "Добро пожаловать! Здесь можно купить быстрый VPN (VLESS) за Telegram Stars.\nВыберите действие ниже.";
    /// Help text.
    help => "Commands:\n/start — main menu\n/trial — free trial (once)\n/buy — plans and payment in Telegram Stars\n/status — your plan, expiry date and server\n/key — your key: a vless:// link and a QR code\n/help — this help\n\nImport the link or scan the QR code in a VLESS client (v2rayNG, Hiddify, Streisand, NekoBox).",
        "Команды:\n/start — главное меню\n/trial — бесплатный пробный период (один раз)\n/buy — тарифы и оплата в Telegram Stars\n/status — ваш тариф, срок и сервер\n/key — ваш ключ: ссылка vless:// и QR-код\n/help — эта справка\n\nИмпортируйте ссылку или отсканируйте QR-код в клиенте VLESS (v2rayNG, Hiddify, Streisand, NekoBox).";
    /// Answer to a command the bot does not know (and to admin commands from non-admins).
    unknown_command => "Sorry, I don't know that command. Send /help to see what I can do.",
        "Извините, такой команды нет. Отправьте /help, чтобы увидеть, что я умею.";
    /// Answer to text or media that is not a command.
    not_a_command => "I only understand commands and the buttons below. Send /help for the list.",
        "Я понимаю только команды и кнопки ниже. Список команд: /help.";
    /// Trial already used or not available.
    trial_used => "The free trial has already been used on this account. Choose a plan with /buy.",
        "Пробный период на этом аккаунте уже использован. Выберите тариф: /buy.";
    /// Trial disabled in config.
    trial_disabled => "There is no free trial at the moment. Choose a plan with /buy.",
        "Сейчас пробного периода нет. Выберите тариф: /buy.";
    /// Plan list header.
    choose_plan => "Choose a plan. Payment is in Telegram Stars; the time is added to your current subscription.",
        "Выберите тариф. Оплата в Telegram Stars; срок добавится к текущей подписке.";
    /// Pre-checkout refusal.
    precheckout_invalid => "This invoice is no longer valid. Please open /buy and try again.",
        "Этот счёт больше не действителен. Откройте /buy и попробуйте снова.";
    /// Pre-checkout refusal when no server can take users.
    precheckout_unavailable => "Sales are paused for a moment. Your Stars were not charged; please try again later.",
        "Продажи временно приостановлены. Звёзды не списаны; попробуйте позже.";
    /// A repeated payment notice (not credited twice).
    payment_duplicate => "This payment has already been credited. Send /status to check your subscription.",
        "Этот платёж уже зачислен. Проверить подписку: /status.";
    /// The database stayed unavailable through every credit attempt: the charge is logged for
    /// support; the user must not pay again.
    payment_delayed => "Your payment was received, but we could not credit it yet because of a problem on our side. Please do not pay again: support has the payment and will credit it.",
        "Платёж получен, но из-за сбоя на нашей стороне мы пока не смогли его зачислить. Пожалуйста, не платите повторно: поддержка видит платёж и зачислит его.";
    /// No subscription yet.
    status_none => "You have no subscription yet. Try /trial or choose a plan with /buy.",
        "У вас пока нет подписки. Попробуйте /trial или выберите тариф: /buy.";
    /// No key to show.
    key_none => "You have no key yet. Start with /trial or /buy.",
        "У вас пока нет ключа. Начните с /trial или /buy.";
    /// Subscription expired.
    key_expired => "Your subscription has expired, so the key no longer works. Renew it with /buy.",
        "Срок подписки истёк, ключ больше не работает. Продлить: /buy.";
    /// Honest note when the node did not confirm the key yet.
    key_pending => "Your subscription is saved, but the VPN server did not confirm your key yet. We keep retrying automatically; the key below should start working within a few minutes.",
        "Подписка сохранена, но VPN-сервер ещё не подтвердил ваш ключ. Мы автоматически повторяем попытки; ключ ниже заработает в течение нескольких минут.";
    /// A temporary internal problem.
    unavailable => "Something went wrong on our side. Please try again in a minute.",
        "Что-то пошло не так на нашей стороне. Попробуйте через минуту.";
    /// A payment handler was cut off after the charge was credited (the key or the reply did
    /// not make it in time).
    payment_credited_key_later => "Your payment is credited. The confirmation did not make it in time: send /key in a minute to get your key, /status to check your subscription.",
        "Платёж зачислен. Подтверждение не успело отправиться: через минуту отправьте /key, чтобы получить ключ, /status — чтобы проверить подписку.";
    /// Callback with data the bot does not recognise.
    unknown_action => "This button is no longer valid.",
        "Эта кнопка больше не действует.";
    /// Payment recorded but its plan is unknown now.
    payment_unknown_plan => "Your payment was received, but its plan no longer exists. Support has been notified and will credit you manually.",
        "Платёж получен, но его тариф больше не существует. Поддержка уведомлена и зачислит его вручную.";
    /// Notice sent when a subscription has expired.
    expired_notice => "Your VPN subscription has expired. Renew it with /buy to keep your key.",
        "Срок вашей VPN-подписки истёк. Продлите её через /buy, чтобы сохранить ключ.";
    /// Button: trial.
    btn_trial => "🎁 Free trial", "🎁 Пробный период";
    /// Button: buy or renew.
    btn_buy => "⭐ Buy / renew", "⭐ Купить / продлить";
    /// Button: status.
    btn_status => "📊 Status", "📊 Статус";
    /// Button: key.
    btn_key => "🔑 My key", "🔑 Мой ключ";
    /// Button: help.
    btn_help => "❓ Help", "❓ Помощь";
}

/// Trial started.
pub fn trial_started(lang: Lang, days: u32, until: DateTime<Utc>) -> String {
    match lang {
        Lang::En => format!(
            "Your free trial is active: {days} day(s), until {}.",
            when(until)
        ),
        Lang::Ru => format!(
            "Пробный период активирован: {days} дн., до {}.",
            when(until)
        ),
    }
}

/// Payment credited.
pub fn payment_credited(lang: Lang, plan: &Plan, until: DateTime<Utc>) -> String {
    match lang {
        Lang::En => format!(
            "Thank you! Payment received: {} ({} days). Your subscription is active until {}.",
            plan.title_en,
            plan.days,
            when(until)
        ),
        Lang::Ru => format!(
            "Спасибо! Оплата получена: {} ({} дн.). Подписка активна до {}.",
            plan.title_ru,
            plan.days,
            when(until)
        ),
    }
}

/// Button label of a plan.
pub fn plan_button(lang: Lang, p: &Plan) -> String {
    format!("{} — {} ⭐", plan_title(lang, p), p.stars)
}

/// Invoice title and description.
pub fn invoice(lang: Lang, p: &Plan) -> (String, String) {
    match lang {
        Lang::En => (
            format!("VPN: {}", p.title_en),
            format!(
                "VLESS VPN access for {} days, added to your subscription.",
                p.days
            ),
        ),
        Lang::Ru => (
            format!("VPN: {}", p.title_ru),
            format!(
                "Доступ к VPN (VLESS) на {} дн., добавляется к подписке.",
                p.days
            ),
        ),
    }
}

/// Subscription status.
pub fn status(
    lang: Lang,
    plan: &str,
    until: DateTime<Utc>,
    node: &str,
    active: bool,
    now: DateTime<Utc>,
) -> String {
    let left = (until - now).num_hours().max(0);
    let (d, h) = (left / 24, left % 24);
    match (lang, active) {
        (Lang::En, true) => format!(
            "Subscription: active\nPlan: {plan}\nValid until: {}\nTime left: {d} d {h} h\nServer: {node}",
            when(until)
        ),
        (Lang::En, false) => format!(
            "Subscription: expired\nPlan: {plan}\nExpired on: {}\nServer: {node}\nRenew with /buy.",
            when(until)
        ),
        (Lang::Ru, true) => format!(
            "Подписка: активна\nТариф: {plan}\nДействует до: {}\nОсталось: {d} дн. {h} ч.\nСервер: {node}",
            when(until)
        ),
        (Lang::Ru, false) => format!(
            "Подписка: истекла\nТариф: {plan}\nИстекла: {}\nСервер: {node}\nПродлить: /buy.",
            when(until)
        ),
    }
}

/// Caption of the key photo.
pub fn key_caption(lang: Lang, link: &str, until: DateTime<Utc>) -> String {
    match lang {
        Lang::En => format!(
            "Your key (valid until {}). Scan the QR code or import this link in a VLESS client:\n\n{link}",
            when(until)
        ),
        Lang::Ru => format!(
            "Ваш ключ (действует до {}). Отсканируйте QR-код или импортируйте ссылку в клиент VLESS:\n\n{link}",
            when(until)
        ),
    }
}

/// Reminder before expiry; `days` is 3 or 1.
pub fn reminder(lang: Lang, days: u32, until: DateTime<Utc>) -> String {
    match lang {
        Lang::En => format!(
            "Reminder: your VPN subscription ends in less than {days} day(s), on {}. Renew with /buy to keep your key.",
            when(until)
        ),
        Lang::Ru => format!(
            "Напоминание: VPN-подписка закончится менее чем через {days} дн., {}. Продлите через /buy, чтобы сохранить ключ.",
            when(until)
        ),
    }
}

/// A refund of `stars` Stars was recorded: what is left of the subscription (`until` while it
/// runs on, `None` when the refund ended it).
pub fn refund_recorded(lang: Lang, stars: i64, until: Option<DateTime<Utc>>) -> String {
    match (lang, until) {
        (Lang::En, Some(t)) => format!(
            "Your payment of {stars} ⭐ was refunded and its days were taken back. Your subscription is active until {}.",
            when(t)
        ),
        (Lang::En, None) => format!(
            "Your payment of {stars} ⭐ was refunded and its days were taken back. Your subscription has ended; choose a plan with /buy to continue."
        ),
        (Lang::Ru, Some(t)) => format!(
            "Платёж на {stars} ⭐ возвращён, оплаченные им дни сняты. Подписка активна до {}.",
            when(t)
        ),
        (Lang::Ru, None) => format!(
            "Платёж на {stars} ⭐ возвращён, оплаченные им дни сняты. Подписка закончилась; продлить: /buy."
        ),
    }
}

/// A refund of `stars` Stars for a payment that added no time (nothing to take back).
pub fn refund_noted(lang: Lang, stars: i64) -> String {
    match (lang, stars > 0) {
        (Lang::En, true) => format!("Your payment of {stars} ⭐ was refunded."),
        (Lang::En, false) => "Your payment was refunded.".to_string(),
        (Lang::Ru, true) => format!("Платёж на {stars} ⭐ возвращён."),
        (Lang::Ru, false) => "Платёж возвращён.".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_follows_the_code() {
        assert_eq!(Lang::from_code(Some("ru")), Lang::Ru);
        assert_eq!(Lang::from_code(Some("ru-RU")), Lang::Ru);
        assert_eq!(Lang::from_code(Some("uk")), Lang::Ru);
        assert_eq!(Lang::from_code(Some("en-GB")), Lang::En);
        assert_eq!(Lang::from_code(Some("de")), Lang::En);
        assert_eq!(Lang::from_code(Some("")), Lang::En);
        assert_eq!(Lang::from_code(None), Lang::En);
        assert_ne!(welcome(Lang::En), welcome(Lang::Ru));
    }
}
