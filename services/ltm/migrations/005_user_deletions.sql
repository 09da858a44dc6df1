-- Long-term memory, v5: the deletion log shared with the memory service (its migration 003 has the same
-- statement): delete_user records who (a SHA-256 of the id), when and how many rows, never content.
-- Safe to run again.
CREATE TABLE IF NOT EXISTS user_deletions (
    id          bigserial PRIMARY KEY,
    user_hash   text NOT NULL,
    service     text NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    counts      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS user_deletions_user_idx ON user_deletions (user_hash, deleted_at);
