-- Conversation store, v1: sessions and messages.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS conversation_sessions (
    session_id       text PRIMARY KEY,
    user_id          text,
    name             text,
    type             text NOT NULL DEFAULT 'chat',
    status           text NOT NULL DEFAULT 'active',
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    context_summary  text,
    relevance_score  real NOT NULL DEFAULT 1.0,
    message_count    integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_activity    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversation_sessions_user_idx ON conversation_sessions (user_id, last_activity DESC);

CREATE TABLE IF NOT EXISTS conversation_messages (
    message_id          text PRIMARY KEY,
    session_id          text NOT NULL REFERENCES conversation_sessions (session_id) ON DELETE CASCADE,
    user_id             text,
    role                text NOT NULL CHECK (role IN ('human', 'ai', 'system')),
    content             text NOT NULL,
    message_type        text NOT NULL DEFAULT 'text',
    message_index       integer NOT NULL,
    parent_message_id   text,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    embedding           vector(384),
    relevance_score     real NOT NULL DEFAULT 1.0,
    is_context_message  boolean NOT NULL DEFAULT false,
    timestamp           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversation_messages_session_idx ON conversation_messages (session_id, message_index);
CREATE INDEX IF NOT EXISTS conversation_messages_user_idx ON conversation_messages (user_id);
