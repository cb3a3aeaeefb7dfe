"""maas_tenant_admit(): a shared admission in one statement (PostgreSQL only)

Under the tenant's advisory lock: read its minute window and live streams, decide as the
limiter's own checks do (streams, requests per minute, tokens per minute; the daily quotas are
decided by the caller, which passes `refuse`), record the call when admitted, and return what
it read, from which the caller builds the refusal (RetryInfo, QuotaFailure) itself.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TENANT_LOCK_NAMESPACE = 0x6D617174  # maas_inference.shared_limits.TENANT_LOCK_NAMESPACE

ADMIT = f"""
CREATE OR REPLACE FUNCTION maas_tenant_admit(
    p_tenant text, p_now double precision, p_stream boolean, p_tokens bigint,
    p_requests_per_minute bigint, p_tokens_per_minute bigint, p_concurrent_streams bigint,
    p_refuse boolean, p_lease_id text, p_replica text, p_lease_seconds double precision,
    OUT admitted boolean, OUT seconds bigint[], OUT requests bigint[], OUT tokens bigint[],
    OUT live_streams bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_second bigint := floor(p_now);
    v_requests bigint;
    v_tokens bigint;
BEGIN
    -- Volatile: each statement below takes a new snapshot, so the reads see every admission
    -- of the tenant committed before the lock was had.
    PERFORM pg_advisory_xact_lock({TENANT_LOCK_NAMESPACE}, hashtext(p_tenant));
    SELECT coalesce(array_agg(u.second ORDER BY u.second), '{{}}'),
           coalesce(array_agg(u.requests ORDER BY u.second), '{{}}'),
           coalesce(array_agg(u.tokens ORDER BY u.second), '{{}}'),
           coalesce(sum(u.requests), 0), coalesce(sum(u.tokens), 0)
      INTO seconds, requests, tokens, v_requests, v_tokens
      FROM tenant_minute_usage u
     WHERE u.tenant = p_tenant AND u.second > v_second - 60;
    SELECT count(*) INTO live_streams FROM tenant_stream_leases l
     WHERE l.tenant = p_tenant AND l.expires_at > p_now;
    admitted := NOT p_refuse
        AND NOT (p_stream AND p_concurrent_streams IS NOT NULL
                 AND live_streams >= p_concurrent_streams)
        AND NOT (p_requests_per_minute IS NOT NULL AND v_requests + 1 > p_requests_per_minute)
        AND NOT (p_stream AND p_tokens_per_minute IS NOT NULL
                 AND v_tokens + greatest(p_tokens, 1) > p_tokens_per_minute);
    IF admitted THEN
        INSERT INTO tenant_minute_usage AS u (tenant, second, requests, tokens)
        VALUES (p_tenant, v_second, 1, p_tokens)
        ON CONFLICT (tenant, second) DO UPDATE
           SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens;
        IF p_lease_id IS NOT NULL THEN
            INSERT INTO tenant_stream_leases (lease_id, tenant, replica, expires_at)
            VALUES (p_lease_id, p_tenant, p_replica, p_now + p_lease_seconds);
        END IF;
    END IF;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # SQLite: one replica, limits in memory
        op.execute(ADMIT)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS maas_tenant_admit")
