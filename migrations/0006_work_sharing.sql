-- Work shared between instances through PostgreSQL (issue 19): every instance runs reconcile,
-- the outbox and expiry; what keeps them apart lives here.

-- Live instances: each instance upserts its row every `reconcile.lease_renew_interval_seconds`
-- with `expires_at = now() + lease_duration`; an instance counts as live while its row has
-- not expired. The reconcile lease manager aims at ceil(nodes / live instances) leases.
CREATE TABLE worker_instances (
    instance_id  TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ NOT NULL
);

-- One reconcile lease per node. `holder` reconciles the node while `expires_at` is in the
-- future; `fencing_token` grows on every acquisition, and every write of a reconcile pass
-- (its outbox intents and its audit row) requires the token it started with, so a pass whose
-- lease was lost writes nothing. `holder` NULL with `expires_at` = the release time: free.
CREATE TABLE node_leases (
    node               TEXT PRIMARY KEY,
    holder             TEXT,
    expires_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    fencing_token      BIGINT NOT NULL DEFAULT 0,
    acquired_at        TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_reconciled_at TIMESTAMPTZ
);

-- Outbox claims: an intent is applied by the instance that claimed it (`FOR UPDATE SKIP
-- LOCKED`) until `claimed_until`; an expired claim is taken over by the next claimer.
ALTER TABLE pending_node_ops ADD COLUMN claimed_by TEXT;
ALTER TABLE pending_node_ops ADD COLUMN claimed_until TIMESTAMPTZ;

-- Which instance, under which lease, wrote a reconcile audit row (NULL: a manual run).
ALTER TABLE reconcile_runs ADD COLUMN instance_id TEXT;
ALTER TABLE reconcile_runs ADD COLUMN fencing_token BIGINT;
