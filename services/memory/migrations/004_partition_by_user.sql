-- Conversation store, v4: the per-user tables hash-partitioned by user_id (docs/partitioning.md).
--
-- conversation_sessions, conversation_messages, conversation_context, session_summary and session_relationships
-- become PARTITION BY HASH (user_id), with as many partitions as ltm's tables (16 by default: see
-- mesh_partition_count below). The keys become (user_id, id): conversation_sessions (user_id, session_id),
-- conversation_messages (user_id, message_id), and the tables that point at a session do so by
-- (user_id, session_id) (conversation_context, session_summary and session_relationships get a user_id column,
-- filled from their session). A message's user_id is its session's user from now on: sessions without a user
-- (inputs of old clients) get the user '' (never a user id: ids are at least one character), and so do their
-- messages. user_preferences (a few rows per user, read by its (user_id, key) key) and user_deletions stay plain.
--
-- Session ids stay unique across users (the STM keys in Redis are per session id, docs/contract-memory.md):
-- conversation_session_ids holds every session id with its user, partitioned by the session id, and is kept by
-- the triggers of conversation_sessions; a session id that another user holds makes the insert of the session
-- fail (unique_violation on conversation_session_ids_pkey). Message ids are unique per user (as ltm's
-- ltm_ingested, chat_ai's dedup keys and reply ids already were): another user's message with the same id is
-- that user's own message.
--
-- Converted in place as ltm's migration 006 does it (same helpers): one transaction, every row copied and counted,
-- the old tables dropped, keys, indexes, foreign keys and triggers built after the copy; a table partitioned
-- already is left alone, so running the file again changes nothing.

-- ---------------------------------------------------------------- helpers (this session only: pg_temp)
-- The partition count: the one the mesh's partitioned tables have when there are some (the memory service's
-- migration 004 may have run first: both services keep one count, so that partition i of every table holds the
-- same users), else the setting mesh.partitions (e.g. PGOPTIONS='-c mesh.partitions=32' for the first start of a
-- service on an empty or unconverted database), else 16. It is fixed from then on: changing it means a rewrite.
CREATE OR REPLACE FUNCTION pg_temp.mesh_partition_count() RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'modulus (\d+)'))[1]::int INTO n
      FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent
     WHERE c.relispartition AND p.relnamespace = current_schema()::regnamespace
       AND (p.relname LIKE 'ltm\_%' OR p.relname LIKE 'conversation\_%' OR p.relname LIKE 'session\_%')
       AND pg_get_expr(c.relpartbound, c.oid) LIKE '%modulus%'
     ORDER BY p.relname, c.relname LIMIT 1;
    IF n IS NULL THEN
        n := coalesce(nullif(current_setting('mesh.partitions', true), ''), '16')::int;
    END IF;
    IF n < 1 OR n > 1024 THEN
        RAISE EXCEPTION 'mesh.partitions must be between 1 and 1024, not %', n;
    END IF;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION pg_temp.mesh_partitioned(t text) RETURNS boolean LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(t))
$$;

-- Rebuild table t as PARTITION BY HASH (key): a table with the same columns, defaults, generated columns and
-- checks, its partitions t_p00 ..., every row copied (column by column from ``from_clause``, the old table by
-- default, aliased src; ``overrides`` gives an expression for some columns instead), the old table dropped with
-- what depends on it (its indexes, triggers, and the foreign keys that point at it), the new one renamed to t.
-- Fails when it did not copy as many rows as the old table has. Keys, indexes, foreign keys and triggers are the
-- caller's to make.
CREATE OR REPLACE FUNCTION pg_temp.mesh_repartition(t text, key text, from_clause text DEFAULT NULL,
                                                    overrides jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n int := pg_temp.mesh_partition_count();
    width int := greatest(2, length((n - 1)::text));
    started timestamptz := clock_timestamp();
    cols text;
    exprs text;
    before bigint;
    copied bigint;
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS'
                   ' INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING COMMENTS) PARTITION BY HASH (%I)',
                   t || '__new', t, key);
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                       t || '_p' || lpad(i::text, width, '0'), t || '__new', n, i);
    END LOOP;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum),
           string_agg(coalesce(overrides ->> attname, 'src.' || quote_ident(attname)), ', ' ORDER BY attnum)
      INTO cols, exprs
      FROM pg_attribute
     WHERE attrelid = t::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    EXECUTE format('SELECT count(*) FROM %I', t) INTO before;
    EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM %s', t || '__new', cols, exprs,
                   coalesce(from_clause, format('%I AS src', t)));
    GET DIAGNOSTICS copied = ROW_COUNT;
    IF copied <> before THEN
        RAISE EXCEPTION '% has % rows but % were copied: nothing was converted', t, before, copied;
    END IF;
    EXECUTE format('DROP TABLE %I CASCADE', t);
    EXECUTE format('ALTER TABLE %I RENAME TO %I', t || '__new', t);
    -- autovacuum analyses the partitions, never a partitioned table itself: its statistics are made here
    EXECUTE format('ANALYZE %I', t);
    RAISE NOTICE '% partitioned by hash (%) into % partitions: % rows copied in % s', t, key, n, copied,
        round(extract(epoch FROM clock_timestamp() - started)::numeric, 2);
    RETURN copied;
END $$;

-- ---------------------------------------------------------------- the triggers' functions, by (user_id, session_id)
-- As in migration 002, every session row a trigger reads or writes is named by its key, so it stays in one
-- partition.
CREATE OR REPLACE FUNCTION conversation_message_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversation_sessions SET last_activity = GREATEST(last_activity, NEW.timestamp),
        message_count = message_count + 1
        WHERE user_id = NEW.user_id AND session_id = NEW.session_id;
    INSERT INTO session_summary AS s (user_id, session_id, message_count, human_count, ai_count, system_count,
                                      total_tokens, first_activity, last_activity, updated_at)
    VALUES (NEW.user_id, NEW.session_id, 1, (NEW.role = 'human')::int, (NEW.role = 'ai')::int,
            (NEW.role = 'system')::int, NEW.token_count, NEW.timestamp, NEW.timestamp, now())
    ON CONFLICT (user_id, session_id) DO UPDATE SET
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

CREATE OR REPLACE FUNCTION conversation_message_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE session_summary SET
        message_count = GREATEST(message_count - 1, 0),
        human_count = GREATEST(human_count - (OLD.role = 'human')::int, 0),
        ai_count = GREATEST(ai_count - (OLD.role = 'ai')::int, 0),
        system_count = GREATEST(system_count - (OLD.role = 'system')::int, 0),
        total_tokens = GREATEST(total_tokens - OLD.token_count, 0),
        updated_at = now()
    WHERE user_id = OLD.user_id AND session_id = OLD.session_id;
    UPDATE conversation_sessions SET message_count = GREATEST(message_count - 1, 0)
        WHERE user_id = OLD.user_id AND session_id = OLD.session_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION conversation_context_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversation_sessions SET last_activity = GREATEST(last_activity, now())
        WHERE user_id = NEW.user_id AND session_id = NEW.session_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION conversation_session_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_summary (user_id, session_id, first_activity, last_activity)
    VALUES (NEW.user_id, NEW.session_id, NEW.created_at, NEW.created_at) ON CONFLICT (user_id, session_id) DO NOTHING;
    RETURN NULL;
END $$;

-- A new session takes its id in conversation_session_ids; an id another user holds fails the statement (and with
-- it the transaction) with unique_violation, constraint conversation_session_ids_pkey, the session id as detail:
-- services/memory/store.py turns that into the same answer as before (another user's session).
CREATE OR REPLACE FUNCTION conversation_session_registered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_session_ids (session_id, user_id) VALUES (NEW.session_id, NEW.user_id)
        ON CONFLICT (session_id) DO NOTHING;
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM conversation_session_ids
                                 WHERE session_id = NEW.session_id AND user_id = NEW.user_id) THEN
        RAISE EXCEPTION 'session_id is another user''s session' USING ERRCODE = 'unique_violation',
            CONSTRAINT = 'conversation_session_ids_pkey', DETAIL = NEW.session_id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION conversation_session_unregistered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM conversation_session_ids WHERE session_id = OLD.session_id AND user_id = OLD.user_id;
    RETURN NULL;
END $$;

-- ---------------------------------------------------------------- conversation_session_ids
-- Which user holds each session id: looked up by the session id alone (the memory service's ownership checks
-- before it knows whose a session is), so partitioned by it.
CREATE TABLE IF NOT EXISTS conversation_session_ids (
    session_id  text NOT NULL,
    user_id     text NOT NULL,
    PRIMARY KEY (session_id)
) PARTITION BY HASH (session_id);

DO $$
DECLARE
    n int := pg_temp.mesh_partition_count();
    width int := greatest(2, length((n - 1)::text));
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'conversation_session_ids'::regclass) THEN
        FOR i IN 0 .. n - 1 LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF conversation_session_ids'
                           ' FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                           'conversation_session_ids_p' || lpad(i::text, width, '0'), n, i);
        END LOOP;
    END IF;
END $$;

-- Writers wait from here to the commit (sessions first, as the write path takes them); readers go on until a
-- table is dropped.
DO $$
BEGIN
    IF NOT (pg_temp.mesh_partitioned('conversation_sessions') AND pg_temp.mesh_partitioned('conversation_messages')
            AND pg_temp.mesh_partitioned('session_summary') AND pg_temp.mesh_partitioned('conversation_context')
            AND pg_temp.mesh_partitioned('session_relationships')) THEN
        LOCK TABLE conversation_sessions, conversation_messages, session_summary, conversation_context,
            session_relationships IN EXCLUSIVE MODE;
    END IF;
END $$;

-- ---------------------------------------------------------------- conversation_sessions
DO $$
BEGIN
    IF pg_temp.mesh_partitioned('conversation_sessions') THEN
        RETURN;
    END IF;
    PERFORM pg_temp.mesh_repartition('conversation_sessions', 'user_id',
                                     overrides => jsonb_build_object('user_id', $q$coalesce(src.user_id, '')$q$));
    ALTER TABLE conversation_sessions ADD CONSTRAINT conversation_sessions_pkey
        PRIMARY KEY (user_id, session_id);  -- was (session_id); user_id was nullable
    CREATE INDEX conversation_sessions_user_idx ON conversation_sessions (user_id, last_activity DESC);
    INSERT INTO conversation_session_ids (session_id, user_id)
        SELECT session_id, user_id FROM conversation_sessions;
    CREATE TRIGGER conversation_sessions_after_insert AFTER INSERT ON conversation_sessions
        FOR EACH ROW EXECUTE FUNCTION conversation_session_created();
    CREATE TRIGGER conversation_sessions_registered AFTER INSERT ON conversation_sessions
        FOR EACH ROW EXECUTE FUNCTION conversation_session_registered();
    CREATE TRIGGER conversation_sessions_unregistered AFTER DELETE ON conversation_sessions
        FOR EACH ROW EXECUTE FUNCTION conversation_session_unregistered();
END $$;

-- ---------------------------------------------------------------- conversation_messages
DO $$
DECLARE
    moved bigint;
BEGIN
    IF pg_temp.mesh_partitioned('conversation_messages') THEN
        RETURN;
    END IF;
    -- the old foreign key guarantees every message its session; the session's user becomes the message's
    SELECT count(*) INTO moved FROM conversation_messages m JOIN conversation_sessions s USING (session_id)
     WHERE m.user_id IS DISTINCT FROM s.user_id;
    IF moved > 0 THEN
        RAISE NOTICE 'conversation_messages: % messages had another user_id than their session''s and now have the '
                     'session''s', moved;
    END IF;
    PERFORM pg_temp.mesh_repartition('conversation_messages', 'user_id',
        'conversation_messages AS src JOIN conversation_sessions AS s ON s.session_id = src.session_id',
        jsonb_build_object('user_id', 's.user_id'));
    ALTER TABLE conversation_messages ADD CONSTRAINT conversation_messages_pkey
        PRIMARY KEY (user_id, message_id);  -- was (message_id)
    CREATE INDEX conversation_messages_session_idx ON conversation_messages (session_id, message_index);
    CREATE INDEX conversation_messages_user_idx ON conversation_messages (user_id);
    CREATE INDEX conversation_messages_session_ts_idx ON conversation_messages (session_id, timestamp);
    CREATE INDEX conversation_messages_unembedded_idx ON conversation_messages (timestamp) WHERE embedding IS NULL;
    ALTER TABLE conversation_messages ADD CONSTRAINT conversation_messages_session_id_fkey
        FOREIGN KEY (user_id, session_id) REFERENCES conversation_sessions (user_id, session_id) ON DELETE CASCADE;
    CREATE TRIGGER conversation_messages_after_insert AFTER INSERT ON conversation_messages
        FOR EACH ROW EXECUTE FUNCTION conversation_message_inserted();
    CREATE TRIGGER conversation_messages_after_delete AFTER DELETE ON conversation_messages
        FOR EACH ROW EXECUTE FUNCTION conversation_message_deleted();
END $$;

-- ---------------------------------------------------------------- the tables of a session: user_id from it
DO $$
BEGIN
    IF NOT pg_temp.mesh_partitioned('session_summary') THEN
        ALTER TABLE session_summary ADD COLUMN IF NOT EXISTS user_id text;
        PERFORM pg_temp.mesh_repartition('session_summary', 'user_id',
            'session_summary AS src JOIN conversation_sessions AS s ON s.session_id = src.session_id',
            jsonb_build_object('user_id', 's.user_id'));
        ALTER TABLE session_summary ADD CONSTRAINT session_summary_pkey
            PRIMARY KEY (user_id, session_id);  -- was (session_id)
        ALTER TABLE session_summary ADD CONSTRAINT session_summary_session_id_fkey
            FOREIGN KEY (user_id, session_id) REFERENCES conversation_sessions (user_id, session_id) ON DELETE CASCADE;
    END IF;

    IF NOT pg_temp.mesh_partitioned('conversation_context') THEN
        ALTER TABLE conversation_context ADD COLUMN IF NOT EXISTS user_id text;
        PERFORM pg_temp.mesh_repartition('conversation_context', 'user_id',
            'conversation_context AS src JOIN conversation_sessions AS s ON s.session_id = src.session_id',
            jsonb_build_object('user_id', 's.user_id'));
        ALTER TABLE conversation_context ADD CONSTRAINT conversation_context_pkey
            PRIMARY KEY (user_id, session_id, context_type, key);  -- was (session_id, context_type, key)
        CREATE INDEX conversation_context_expiry_idx ON conversation_context (expires_at)
            WHERE expires_at IS NOT NULL;
        ALTER TABLE conversation_context ADD CONSTRAINT conversation_context_session_id_fkey
            FOREIGN KEY (user_id, session_id) REFERENCES conversation_sessions (user_id, session_id) ON DELETE CASCADE;
        CREATE TRIGGER conversation_context_after_write AFTER INSERT OR UPDATE ON conversation_context
            FOR EACH ROW EXECUTE FUNCTION conversation_context_touched();
    END IF;

    -- a link joins two sessions of one user (services/memory/store.py link_sessions): its user is the source's
    IF NOT pg_temp.mesh_partitioned('session_relationships') THEN
        ALTER TABLE session_relationships ADD COLUMN IF NOT EXISTS user_id text;
        PERFORM pg_temp.mesh_repartition('session_relationships', 'user_id',
            'session_relationships AS src JOIN conversation_sessions AS s ON s.session_id = src.source_session_id',
            jsonb_build_object('user_id', 's.user_id'));
        ALTER TABLE session_relationships ADD CONSTRAINT session_relationships_pkey
            PRIMARY KEY (user_id, source_session_id, target_session_id, relation_type);  -- was without user_id
        CREATE INDEX session_relationships_target_idx ON session_relationships (target_session_id);
        ALTER TABLE session_relationships ADD CONSTRAINT session_relationships_source_session_id_fkey
            FOREIGN KEY (user_id, source_session_id) REFERENCES conversation_sessions (user_id, session_id)
            ON DELETE CASCADE;
        ALTER TABLE session_relationships ADD CONSTRAINT session_relationships_target_session_id_fkey
            FOREIGN KEY (user_id, target_session_id) REFERENCES conversation_sessions (user_id, session_id)
            ON DELETE CASCADE;
    END IF;
END $$;
