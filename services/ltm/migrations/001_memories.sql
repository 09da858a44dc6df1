-- Long-term memory, v1: typed memories with embeddings, exact per-user search.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS ltm_memories (
    memory_id          uuid PRIMARY KEY,
    user_id            text NOT NULL,
    type               text NOT NULL,
    content            text NOT NULL,
    content_hash       text NOT NULL,
    embedding          vector(384) NOT NULL,
    confidence         real NOT NULL DEFAULT 1.0,
    entities           text[] NOT NULL DEFAULT '{}',
    source_message_id  text,
    source_session_id  text,
    source_timestamp   double precision,
    speaker            text,
    meta               jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_accessed      timestamptz,
    access_count       integer NOT NULL DEFAULT 0
);
-- Exact search within a user: a btree on user_id, then an exact distance sort
-- (no HNSW: a filtered ANN index returns almost nothing per user, see shared/README).
CREATE INDEX IF NOT EXISTS ltm_memories_user_idx ON ltm_memories (user_id);
-- Concurrent ingest of the same content never duplicates a memory.
CREATE UNIQUE INDEX IF NOT EXISTS ltm_memories_user_hash_uq ON ltm_memories (user_id, type, content_hash);

-- Which updates were ingested: the idempotency record, written in the same transaction.
CREATE TABLE IF NOT EXISTS ltm_ingested (
    user_id     text NOT NULL,
    message_id  text NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, message_id)
);

CREATE TABLE IF NOT EXISTS ltm_profiles (
    user_id     text PRIMARY KEY,
    explicit    jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated     jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
