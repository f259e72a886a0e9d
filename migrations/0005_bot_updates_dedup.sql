-- Telegram updates seen by any instance, keyed by update_id: an update delivered twice (a
-- webhook retry, two instances, a new polling leader) is handled once. A row is a claim while
-- `handled_at` is NULL and `lease_until` is in the future (an instance is handling it); a claim
-- whose lease passed (its instance died) may be taken over; a handled row answers every later
-- delivery as a duplicate. Rows older than telegram.dedup_retention_seconds are deleted in
-- bounded batches (Telegram keeps an undelivered update for at most 24 hours).
CREATE TABLE IF NOT EXISTS bot_updates (
    update_id   BIGINT PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until TIMESTAMPTZ,
    handled_at  TIMESTAMPTZ,
    attempts    INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS bot_updates_received_at ON bot_updates (received_at);
