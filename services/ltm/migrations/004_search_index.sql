-- Long-term memory, v4: what keeps each ltm process's search index (services/ltm/search_index.py) in step with
-- this table. Idempotent.

-- txid: the transaction that last wrote the row (inserted it, or changed a column an index holds). An index
-- reads the rows of a user written by transactions not older than the oldest one still running at its previous
-- read (pg_snapshot_xmin), so a row committed late is never missed. NULL for rows written before this migration
-- (they are read when a user's index is first loaded).
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS txid xid8;
ALTER TABLE ltm_memories ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS ltm_memories_user_txid_idx ON ltm_memories (user_id, txid);

CREATE OR REPLACE FUNCTION ltm_memories_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END $$;

-- The columns of a candidate row (services/ltm/search_index.py ROW_COLUMNS) that are updated in place: use
-- counts, confidence, supersession, merged entities and metadata. (decay, mentions, sources: not held.)
DROP TRIGGER IF EXISTS ltm_memories_touched ON ltm_memories;
CREATE TRIGGER ltm_memories_touched BEFORE UPDATE ON ltm_memories FOR EACH ROW
    WHEN ((OLD.confidence, OLD.access_count, OLD.last_accessed, OLD.valid_to, OLD.superseded_by, OLD.entities,
           OLD.meta, OLD.source_message_id, OLD.source_timestamp, OLD.speaker, OLD.created_at)
          IS DISTINCT FROM
          (NEW.confidence, NEW.access_count, NEW.last_accessed, NEW.valid_to, NEW.superseded_by, NEW.entities,
           NEW.meta, NEW.source_message_id, NEW.source_timestamp, NEW.speaker, NEW.created_at))
    EXECUTE FUNCTION ltm_memories_touched();

-- A deletion (or a change of what an index keeps apart from the rows: embedding, content, type, session, user)
-- gives the user a new epoch, from a sequence so that a value never comes back (a user deleted and created again included); an
-- index whose epoch differs reloads the user.
CREATE SEQUENCE IF NOT EXISTS ltm_search_epoch_seq;
CREATE TABLE IF NOT EXISTS ltm_search_epochs (
    user_id  text PRIMARY KEY,
    epoch    bigint NOT NULL
);

CREATE OR REPLACE FUNCTION ltm_search_epoch_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ltm_search_epochs AS e (user_id, epoch)
    SELECT d.user_id, nextval('ltm_search_epoch_seq') FROM (SELECT DISTINCT user_id FROM gone) AS d
    ON CONFLICT (user_id) DO UPDATE SET epoch = EXCLUDED.epoch;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION ltm_search_epoch_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ltm_search_epochs AS e (user_id, epoch)
    SELECT u, nextval('ltm_search_epoch_seq') FROM (SELECT DISTINCT unnest(ARRAY[OLD.user_id, NEW.user_id])) AS d(u)
    ON CONFLICT (user_id) DO UPDATE SET epoch = EXCLUDED.epoch;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS ltm_memories_search_deleted ON ltm_memories;
CREATE TRIGGER ltm_memories_search_deleted AFTER DELETE ON ltm_memories
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION ltm_search_epoch_deleted();

DROP TRIGGER IF EXISTS ltm_memories_search_changed ON ltm_memories;
CREATE TRIGGER ltm_memories_search_changed
    AFTER UPDATE OF user_id, embedding, content, type, source_session_id ON ltm_memories
    FOR EACH ROW EXECUTE FUNCTION ltm_search_epoch_changed();
