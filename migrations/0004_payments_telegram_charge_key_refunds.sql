-- Payments keyed on Telegram's charge id, refunds recorded once per charge, outbox failures
-- typed (issue 12, items 2, 3 and 7).

-- A payment is credited exactly once per `telegram_payment_charge_id`: the identifier Telegram
-- guarantees unique. The provider's id stays as data (NULL for Telegram Stars, where it is
-- empty); before this migration it was the key, holding Telegram's id when empty.
ALTER TABLE payments DROP CONSTRAINT payments_provider_charge_id_key;
ALTER TABLE payments ALTER COLUMN provider_charge_id DROP NOT NULL;
UPDATE payments SET provider_charge_id = NULL
    WHERE provider_charge_id = '' OR provider_charge_id = telegram_charge_id;
-- Telegram never reuses a charge id, so two rows sharing one cannot come from it; should a
-- hand-made row collide, both rows (and their money) are kept, the later ones marked, so the
-- unique key can be created without dropping a payment.
UPDATE payments p SET telegram_charge_id = p.telegram_charge_id || '#dup' || p.id
    FROM payments q
    WHERE q.telegram_charge_id = p.telegram_charge_id AND q.id < p.id;
ALTER TABLE payments ADD CONSTRAINT payments_telegram_charge_id_key UNIQUE (telegram_charge_id);
-- Days the payment added (NULL on rows written before: the plan's current days apply).
ALTER TABLE payments ADD COLUMN days INTEGER CHECK (days >= 0);

-- One refund per Telegram charge id, whoever reported it first (a `refunded_payment` message
-- or the admin's `/refund` confirmed by Telegram). `payment_id` is NULL for a refund of a
-- charge never recorded here; a payment that arrives after its refund is recorded and not
-- credited.
CREATE TABLE payment_refunds (
    id                 BIGSERIAL PRIMARY KEY,
    telegram_charge_id TEXT NOT NULL UNIQUE,
    payment_id         BIGINT REFERENCES payments (id),
    user_id            BIGINT NOT NULL,
    currency           TEXT NOT NULL,
    amount             BIGINT NOT NULL CHECK (amount >= 0),
    source             TEXT NOT NULL CHECK (source IN ('telegram', 'admin')),
    subscription_id    BIGINT REFERENCES subscriptions (id),
    -- The subscription's expiry before and after the refund took back its days.
    expires_before     TIMESTAMPTZ,
    expires_after      TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The bounded error type of an intent's last failure (`connect`, `http_5xx`, `uuid_conflict`,
-- ...), for metrics and alerts; `last_error` keeps the text.
ALTER TABLE pending_node_ops ADD COLUMN last_error_type TEXT;
