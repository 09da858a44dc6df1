-- Long-term memory, v12: a deletion costs the search index what it deletes, not a reload of the user. Idempotent.
--
-- Until now every deletion gave the user a new epoch (migration 004), and every ltm process holding the user loaded
-- all of its memories again: each consolidation that merged one duplicate, each memory a user asked to forget, each
-- budget cleanup, reread the user's whole history in every process (about 0.2 ms a memory). Deleted rows are now
-- logged here, by the deleting transaction (txid), and an index reads them with the rows written since its last read
-- (services/ltm/search_index.py: the same horizon rule as for new rows, so a deletion committed late is not missed)
-- and drops them from what it holds.
--
-- A deletion of a whole user still gives a new epoch and logs nothing (store.delete_user sets
-- mesh.search_deletions = 'epoch' for its transaction): it removes the epoch row and this log's rows with the rest.
--
-- The log is pruned per user by the optimize (rows older than LTM_SEARCH_DELETIONS_KEEP_S and than every transaction
-- running); ltm_search_epochs.log_floor records the newest txid pruned, and an index whose last read is not newer than
-- that loads the user again (it may have missed a pruned deletion). ltm copies of the code before this migration must
-- not run beside those after it (docs/operations.md, "Shutting down and restarting").
CREATE TABLE IF NOT EXISTS ltm_search_deletions (
    user_id     text NOT NULL,
    memory_id   uuid NOT NULL,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, memory_id)
) PARTITION BY HASH (user_id);
CREATE INDEX IF NOT EXISTS ltm_search_deletions_user_txid_idx ON ltm_search_deletions (user_id, txid);

-- its partitions: the count of ltm_memories' (006), else mesh.partitions, else 16; made once (as in 007)
DO $$
DECLARE
    n int;
    width int;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'ltm_search_deletions'::regclass) THEN
        RETURN;
    END IF;
    SELECT count(*) INTO n FROM pg_inherits WHERE inhparent = 'ltm_memories'::regclass;
    IF n = 0 THEN
        n := coalesce(nullif(current_setting('mesh.partitions', true), ''), '16')::int;
    END IF;
    width := greatest(2, length((n - 1)::text));
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF ltm_search_deletions FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                       'ltm_search_deletions_p' || lpad(i::text, width, '0'), n, i);
    END LOOP;
END $$;

ALTER TABLE ltm_search_epochs ADD COLUMN IF NOT EXISTS log_floor xid8;

-- the statement trigger of 004 (on the partitioned table since 006): the deleted rows into the log, or, for a whole
-- user's deletion, a new epoch as before
CREATE OR REPLACE FUNCTION ltm_search_epoch_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('mesh.search_deletions', true) = 'epoch' THEN
        INSERT INTO ltm_search_epochs AS e (user_id, epoch)
        SELECT d.user_id, nextval('ltm_search_epoch_seq') FROM (SELECT DISTINCT user_id FROM gone) AS d
        ON CONFLICT (user_id) DO UPDATE SET epoch = EXCLUDED.epoch;
    ELSE
        INSERT INTO ltm_search_deletions AS d (user_id, memory_id)
        SELECT user_id, memory_id FROM gone
        ON CONFLICT (user_id, memory_id) DO UPDATE SET txid = EXCLUDED.txid, deleted_at = EXCLUDED.deleted_at;
    END IF;
    RETURN NULL;
END $$;
