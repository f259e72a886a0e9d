-- A user's latest subscription (`WHERE owner_id = $1 ORDER BY id DESC LIMIT 1`, on every
-- /status, /key and payment) as one backward index probe, also for a user with many
-- subscriptions (with the index on owner_id alone PostgreSQL fetched and sorted them all).
CREATE INDEX subscriptions_owner_latest ON subscriptions (owner_id, id);
DROP INDEX subscriptions_owner;
