-- Conversation store, v3: the deletion log. A user's deletion (delete_user, services/memory/erase.py) is
-- recorded here without content: a SHA-256 of the user id (shared/runtime/erase.py user_hash), which service,
-- when, and how many rows and entries went. ltm writes its own rows into the same table (its migration 005
-- creates it too). Safe to run again.
CREATE TABLE IF NOT EXISTS user_deletions (
    id          bigserial PRIMARY KEY,
    user_hash   text NOT NULL,
    service     text NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    counts      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS user_deletions_user_idx ON user_deletions (user_hash, deleted_at);
