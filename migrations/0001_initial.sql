-- vpnbot initial schema: bot users, subscriptions, payments, the node-operation outbox and the
-- reconcile audit trail.

CREATE TABLE bot_users (
    telegram_id   BIGINT PRIMARY KEY,
    language_code TEXT NOT NULL DEFAULT 'en',
    trial_used    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id           BIGSERIAL PRIMARY KEY,
    owner_id     BIGINT NOT NULL REFERENCES bot_users (telegram_id),
    node         TEXT NOT NULL,
    vless_uuid   UUID NOT NULL UNIQUE,
    status       TEXT NOT NULL DEFAULT 'active'
                 CHECK (status IN ('active', 'expired', 'cancelled')),
    plan         TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    reminded_3d  BOOLEAN NOT NULL DEFAULT FALSE,
    reminded_1d  BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Reconcile snapshot: keyset scan of one node's live subscriptions ordered by UUID, and the
-- batched live re-check by UUID (the UNIQUE index above) .
CREATE INDEX subscriptions_live_by_node ON subscriptions (node, vless_uuid)
    WHERE status = 'active';
-- Expiry worker and reminders scan by expiry time.
CREATE INDEX subscriptions_active_expiry ON subscriptions (expires_at) WHERE status = 'active';
CREATE INDEX subscriptions_owner ON subscriptions (owner_id);

CREATE TABLE payments (
    id                         BIGSERIAL PRIMARY KEY,
    -- Telegram's provider charge id is unique per charge: a repeated update credits once.
    provider_charge_id         TEXT NOT NULL UNIQUE,
    telegram_charge_id         TEXT NOT NULL,
    user_id                    BIGINT NOT NULL REFERENCES bot_users (telegram_id),
    subscription_id            BIGINT REFERENCES subscriptions (id),
    plan                       TEXT NOT NULL,
    currency                   TEXT NOT NULL,
    amount                     BIGINT NOT NULL CHECK (amount >= 0),
    created_at                 TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Outbox of node operations: written in the same transaction as the state change that needs
-- them, applied outside any transaction, retried with backoff until the node confirms.
CREATE TABLE pending_node_ops (
    id              BIGSERIAL PRIMARY KEY,
    node            TEXT NOT NULL,
    op              TEXT NOT NULL CHECK (op IN ('add', 'remove', 'update')),
    vless_uuid      UUID NOT NULL,
    email           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at         TIMESTAMPTZ
);
CREATE INDEX pending_node_ops_due ON pending_node_ops (next_attempt_at) WHERE done_at IS NULL;
-- At most one open operation per node and UUID: a newer intent replaces an older one.
CREATE UNIQUE INDEX pending_node_ops_open_uuid ON pending_node_ops (node, vless_uuid)
    WHERE done_at IS NULL;

CREATE TABLE reconcile_runs (
    id              BIGSERIAL PRIMARY KEY,
    node            TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ NOT NULL,
    outcome         TEXT NOT NULL
                    CHECK (outcome IN ('ok', 'failed', 'timeout', 'guarded', 'dry_run')),
    dry_run         BOOLEAN NOT NULL,
    db_live         BIGINT NOT NULL DEFAULT 0,
    node_users      BIGINT NOT NULL DEFAULT 0,
    orphans         BIGINT NOT NULL DEFAULT 0,
    missing         BIGINT NOT NULL DEFAULT 0,
    kept_by_recheck BIGINT NOT NULL DEFAULT 0,
    removed         BIGINT NOT NULL DEFAULT 0,
    readded         BIGINT NOT NULL DEFAULT 0,
    -- Per-phase durations in seconds: {"snapshot": 0.12, "list": 0.5, ...}.
    phase_seconds   JSONB NOT NULL DEFAULT '{}'::jsonb,
    error           TEXT
);
CREATE INDEX reconcile_runs_node_time ON reconcile_runs (node, started_at DESC);
