-- A user who blocked the bot (a send answered 403) is remembered and not sent to again until
-- they use the bot again (upsert_user clears it).
ALTER TABLE bot_users ADD COLUMN IF NOT EXISTS blocked_at TIMESTAMPTZ;
