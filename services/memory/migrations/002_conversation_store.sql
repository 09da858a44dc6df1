-- Conversation store, v2: context, preferences, session links, per-session summary, and the triggers
-- that keep last_activity and session_summary current. Every statement is safe to run again.

-- Messages carry their token count (counted by the service, see services/memory/tokens.py) so that
-- session_summary can keep token totals without re-tokenising anything.
ALTER TABLE conversation_messages ADD COLUMN IF NOT EXISTS token_count integer NOT NULL DEFAULT 0;
-- The rolling STM summary is kept beside the session so that rehydration after a Redis loss restores it
-- instead of re-summarising the whole conversation: the text is context_summary, the rest is here.
ALTER TABLE conversation_sessions ADD COLUMN IF NOT EXISTS summary_state jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Access paths: newest sessions of a user (exists), a session's messages in order (exists), messages of a
-- user for exact semantic search (exists, see ../shared/README.md on filtered vector indexes).
CREATE INDEX IF NOT EXISTS conversation_messages_session_ts_idx ON conversation_messages (session_id, timestamp);
-- The background embedder's queue: messages still without an embedding.
CREATE INDEX IF NOT EXISTS conversation_messages_unembedded_idx ON conversation_messages (timestamp)
    WHERE embedding IS NULL;

-- parent_message_id has no foreign key on purpose: a reply may be stored before the input it answers
-- (the two streams are consumed independently).

CREATE TABLE IF NOT EXISTS conversation_context (
    session_id       text NOT NULL REFERENCES conversation_sessions (session_id) ON DELETE CASCADE,
    context_type     text NOT NULL CHECK (context_type IN ('conversation', 'preference', 'project', 'user_info')),
    key              text NOT NULL,
    value            jsonb NOT NULL,
    relevance_score  real NOT NULL DEFAULT 1.0,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    PRIMARY KEY (session_id, context_type, key)
);
CREATE INDEX IF NOT EXISTS conversation_context_expiry_idx ON conversation_context (expires_at)
    WHERE expires_at IS NOT NULL;

-- A sensitive preference keeps only ciphertext (value_encrypted, a Fernet token of the JSON value); value is NULL.
CREATE TABLE IF NOT EXISTS user_preferences (
    user_id          text NOT NULL,
    key              text NOT NULL,
    value            jsonb,
    value_encrypted  bytea,
    sensitive        boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key),
    CHECK ((sensitive AND value IS NULL AND value_encrypted IS NOT NULL)
           OR (NOT sensitive AND value IS NOT NULL AND value_encrypted IS NULL))
);

CREATE TABLE IF NOT EXISTS session_relationships (
    source_session_id  text NOT NULL REFERENCES conversation_sessions (session_id) ON DELETE CASCADE,
    target_session_id  text NOT NULL REFERENCES conversation_sessions (session_id) ON DELETE CASCADE,
    relation_type      text NOT NULL,
    strength           real NOT NULL DEFAULT 1.0 CHECK (strength >= 0 AND strength <= 1),
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_session_id, target_session_id, relation_type),
    CHECK (source_session_id <> target_session_id)
);
CREATE INDEX IF NOT EXISTS session_relationships_target_idx ON session_relationships (target_session_id);

CREATE TABLE IF NOT EXISTS session_summary (
    session_id        text PRIMARY KEY REFERENCES conversation_sessions (session_id) ON DELETE CASCADE,
    message_count     integer NOT NULL DEFAULT 0,
    human_count       integer NOT NULL DEFAULT 0,
    ai_count          integer NOT NULL DEFAULT 0,
    system_count      integer NOT NULL DEFAULT 0,
    total_tokens      bigint NOT NULL DEFAULT 0,
    first_activity    timestamptz,
    last_activity     timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- A new message: the session counts it and its last_activity moves forward, and its summary row counts it.
CREATE OR REPLACE FUNCTION conversation_message_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversation_sessions SET last_activity = GREATEST(last_activity, NEW.timestamp),
        message_count = message_count + 1
        WHERE session_id = NEW.session_id;
    INSERT INTO session_summary AS s (session_id, message_count, human_count, ai_count, system_count, total_tokens,
                                      first_activity, last_activity, updated_at)
    VALUES (NEW.session_id, 1, (NEW.role = 'human')::int, (NEW.role = 'ai')::int, (NEW.role = 'system')::int,
            NEW.token_count, NEW.timestamp, NEW.timestamp, now())
    ON CONFLICT (session_id) DO UPDATE SET
        message_count = s.message_count + 1,
        human_count = s.human_count + EXCLUDED.human_count,
        ai_count = s.ai_count + EXCLUDED.ai_count,
        system_count = s.system_count + EXCLUDED.system_count,
        total_tokens = s.total_tokens + EXCLUDED.total_tokens,
        first_activity = LEAST(s.first_activity, EXCLUDED.first_activity),
        last_activity = GREATEST(s.last_activity, EXCLUDED.last_activity),
        updated_at = now();
    RETURN NULL;
END $$;

-- A deleted message is taken out of the counts (when the whole session goes, the rows it would update are gone).
CREATE OR REPLACE FUNCTION conversation_message_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE session_summary SET
        message_count = GREATEST(message_count - 1, 0),
        human_count = GREATEST(human_count - (OLD.role = 'human')::int, 0),
        ai_count = GREATEST(ai_count - (OLD.role = 'ai')::int, 0),
        system_count = GREATEST(system_count - (OLD.role = 'system')::int, 0),
        total_tokens = GREATEST(total_tokens - OLD.token_count, 0),
        updated_at = now()
    WHERE session_id = OLD.session_id;
    UPDATE conversation_sessions SET message_count = GREATEST(message_count - 1, 0)
        WHERE session_id = OLD.session_id;
    RETURN NULL;
END $$;

-- Any change to a session's context counts as activity on the session.
CREATE OR REPLACE FUNCTION conversation_context_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversation_sessions SET last_activity = GREATEST(last_activity, now())
        WHERE session_id = NEW.session_id;
    RETURN NULL;
END $$;

-- Every session has its summary row from the start, so get_session_summary of an empty session works.
CREATE OR REPLACE FUNCTION conversation_session_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_summary (session_id, first_activity, last_activity)
    VALUES (NEW.session_id, NEW.created_at, NEW.created_at) ON CONFLICT (session_id) DO NOTHING;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER conversation_messages_after_insert AFTER INSERT ON conversation_messages
    FOR EACH ROW EXECUTE FUNCTION conversation_message_inserted();
CREATE OR REPLACE TRIGGER conversation_messages_after_delete AFTER DELETE ON conversation_messages
    FOR EACH ROW EXECUTE FUNCTION conversation_message_deleted();
CREATE OR REPLACE TRIGGER conversation_context_after_write AFTER INSERT OR UPDATE ON conversation_context
    FOR EACH ROW EXECUTE FUNCTION conversation_context_touched();
CREATE OR REPLACE TRIGGER conversation_sessions_after_insert AFTER INSERT ON conversation_sessions
    FOR EACH ROW EXECUTE FUNCTION conversation_session_created();

-- Sessions made before this migration get their summary rows now.
INSERT INTO session_summary (session_id, message_count, human_count, ai_count, system_count, total_tokens,
                             first_activity, last_activity)
SELECT s.session_id, count(m.message_id), count(*) FILTER (WHERE m.role = 'human'),
       count(*) FILTER (WHERE m.role = 'ai'), count(*) FILTER (WHERE m.role = 'system'),
       COALESCE(sum(m.token_count), 0), COALESCE(min(m.timestamp), s.created_at),
       COALESCE(max(m.timestamp), s.last_activity)
FROM conversation_sessions s LEFT JOIN conversation_messages m ON m.session_id = s.session_id
GROUP BY s.session_id
ON CONFLICT (session_id) DO NOTHING;
