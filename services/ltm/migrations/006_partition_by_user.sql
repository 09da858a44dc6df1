-- Long-term memory, v6: the per-user tables hash-partitioned by user_id (docs/partitioning.md).
--
-- ltm_memories, ltm_entities, ltm_relations, ltm_memory_entities, ltm_ingested and ltm_archive become
-- PARTITION BY HASH (user_id) with N partitions <table>_p00 ... (N: see mesh_partition_count below; 16 by
-- default). Every primary key and unique index starts with user_id (a partitioned table's keys must hold the
-- partition key), and the foreign keys between these tables are composite (user_id, id): a link or relation can
-- only point at rows of its own user, which live in the same partition (and, under Citus, the same shard).
-- ltm_profiles, ltm_user_state and ltm_search_epochs (one row per user, read by their user_id key) and
-- user_deletions stay plain tables.
--
-- An existing table is converted in place, keeping every row: it is copied into a partitioned table with the same
-- columns, defaults, generated columns and checks (CREATE TABLE ... LIKE), the old one is dropped, and then the
-- keys, indexes, foreign keys and triggers are built on the new one (bulk index builds after the copy). The file
-- is one transaction (shared/runtime/db.py): writers of these tables wait for all of it, readers from the first
-- drop on; it rewrites every row (docs/partitioning.md: lock, time measured on 100k memories, maintenance
-- window). A fresh database runs 001-005 and then this file on empty tables, so it ends in the same schema.
-- A table that is partitioned already is left alone: running the file again changes nothing.

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

-- Writers wait from here to the commit (in the order ingest writes these tables, so it never waits on us in a
-- cycle); readers go on until a table is dropped.
DO $$
BEGIN
    IF NOT (pg_temp.mesh_partitioned('ltm_ingested') AND pg_temp.mesh_partitioned('ltm_memories')
            AND pg_temp.mesh_partitioned('ltm_entities') AND pg_temp.mesh_partitioned('ltm_memory_entities')
            AND pg_temp.mesh_partitioned('ltm_relations') AND pg_temp.mesh_partitioned('ltm_archive')) THEN
        LOCK TABLE ltm_ingested, ltm_memories, ltm_entities, ltm_memory_entities, ltm_relations, ltm_archive
            IN EXCLUSIVE MODE;
    END IF;
END $$;

-- ---------------------------------------------------------------- ltm_memories
DO $$
BEGIN
    IF pg_temp.mesh_partitioned('ltm_memories') THEN
        RETURN;
    END IF;
    PERFORM pg_temp.mesh_repartition('ltm_memories', 'user_id');
    -- was PRIMARY KEY (memory_id): memory ids are uuid4, unique per user is what the table can enforce
    ALTER TABLE ltm_memories ADD CONSTRAINT ltm_memories_pkey PRIMARY KEY (user_id, memory_id);
    CREATE INDEX ltm_memories_user_idx ON ltm_memories (user_id);
    CREATE UNIQUE INDEX ltm_memories_user_hash_uq ON ltm_memories (user_id, type, content_hash);
    CREATE INDEX ltm_memories_slot_idx ON ltm_memories (user_id, subject, slot) WHERE slot IS NOT NULL;
    CREATE INDEX ltm_memories_search_tsv_idx ON ltm_memories USING gin (search_tsv);
    CREATE INDEX ltm_memories_session_turn_idx
        ON ltm_memories (user_id, source_session_id, source_timestamp) WHERE type = 'episodic';
    CREATE INDEX ltm_memories_user_txid_idx ON ltm_memories (user_id, txid);
    -- the triggers of migration 004 (their functions are unchanged; on a partitioned table the row triggers run
    -- on every partition, the statement trigger once per statement on the table, with the deleted rows of all)
    CREATE TRIGGER ltm_memories_touched BEFORE UPDATE ON ltm_memories FOR EACH ROW
        WHEN ((OLD.confidence, OLD.access_count, OLD.last_accessed, OLD.valid_to, OLD.superseded_by, OLD.entities,
               OLD.meta, OLD.source_message_id, OLD.source_timestamp, OLD.speaker, OLD.created_at)
              IS DISTINCT FROM
              (NEW.confidence, NEW.access_count, NEW.last_accessed, NEW.valid_to, NEW.superseded_by, NEW.entities,
               NEW.meta, NEW.source_message_id, NEW.source_timestamp, NEW.speaker, NEW.created_at))
        EXECUTE FUNCTION ltm_memories_touched();
    CREATE TRIGGER ltm_memories_search_deleted AFTER DELETE ON ltm_memories
        REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION ltm_search_epoch_deleted();
    CREATE TRIGGER ltm_memories_search_changed
        AFTER UPDATE OF user_id, embedding, content, type, source_session_id ON ltm_memories
        FOR EACH ROW EXECUTE FUNCTION ltm_search_epoch_changed();
END $$;

-- ---------------------------------------------------------------- ltm_entities
DO $$
BEGIN
    IF pg_temp.mesh_partitioned('ltm_entities') THEN
        RETURN;
    END IF;
    PERFORM pg_temp.mesh_repartition('ltm_entities', 'user_id');
    ALTER TABLE ltm_entities ADD CONSTRAINT ltm_entities_pkey PRIMARY KEY (user_id, entity_id);  -- was (entity_id)
    ALTER TABLE ltm_entities ADD CONSTRAINT ltm_entities_user_id_name_norm_key UNIQUE (user_id, name_norm);
END $$;

-- ---------------------------------------------------------------- ltm_relations
DO $$
BEGIN
    IF pg_temp.mesh_partitioned('ltm_relations') THEN
        RETURN;
    END IF;
    PERFORM pg_temp.mesh_repartition('ltm_relations', 'user_id');
    ALTER TABLE ltm_relations ADD CONSTRAINT ltm_relations_pkey PRIMARY KEY (user_id, relation_id);  -- was (relation_id)
    ALTER TABLE ltm_relations ADD CONSTRAINT ltm_relations_user_id_subject_id_predicate_object_id_key
        UNIQUE (user_id, subject_id, predicate, object_id);
    CREATE INDEX ltm_relations_object_idx ON ltm_relations (user_id, object_id);
    -- were (subject_id) / (object_id) REFERENCES ltm_entities (entity_id)
    ALTER TABLE ltm_relations ADD CONSTRAINT ltm_relations_subject_id_fkey FOREIGN KEY (user_id, subject_id)
        REFERENCES ltm_entities (user_id, entity_id) ON DELETE CASCADE;
    ALTER TABLE ltm_relations ADD CONSTRAINT ltm_relations_object_id_fkey FOREIGN KEY (user_id, object_id)
        REFERENCES ltm_entities (user_id, entity_id) ON DELETE CASCADE;
END $$;

-- ---------------------------------------------------------------- ltm_memory_entities
DO $$
BEGIN
    IF pg_temp.mesh_partitioned('ltm_memory_entities') THEN
        RETURN;
    END IF;
    PERFORM pg_temp.mesh_repartition('ltm_memory_entities', 'user_id');
    ALTER TABLE ltm_memory_entities ADD CONSTRAINT ltm_memory_entities_pkey
        PRIMARY KEY (user_id, memory_id, entity_id);  -- was (memory_id, entity_id)
    CREATE INDEX ltm_memory_entities_entity_idx ON ltm_memory_entities (user_id, entity_id);
    -- were (memory_id) REFERENCES ltm_memories (memory_id), (entity_id) REFERENCES ltm_entities (entity_id)
    ALTER TABLE ltm_memory_entities ADD CONSTRAINT ltm_memory_entities_memory_id_fkey FOREIGN KEY (user_id, memory_id)
        REFERENCES ltm_memories (user_id, memory_id) ON DELETE CASCADE;
    ALTER TABLE ltm_memory_entities ADD CONSTRAINT ltm_memory_entities_entity_id_fkey FOREIGN KEY (user_id, entity_id)
        REFERENCES ltm_entities (user_id, entity_id) ON DELETE CASCADE;
END $$;

-- ---------------------------------------------------------------- ltm_ingested, ltm_archive (keys had user_id)
DO $$
BEGIN
    IF NOT pg_temp.mesh_partitioned('ltm_ingested') THEN
        PERFORM pg_temp.mesh_repartition('ltm_ingested', 'user_id');
        ALTER TABLE ltm_ingested ADD CONSTRAINT ltm_ingested_pkey PRIMARY KEY (user_id, message_id);
    END IF;
    IF NOT pg_temp.mesh_partitioned('ltm_archive') THEN
        PERFORM pg_temp.mesh_repartition('ltm_archive', 'user_id');
        ALTER TABLE ltm_archive ADD CONSTRAINT ltm_archive_pkey PRIMARY KEY (user_id, memory_id);
    END IF;
END $$;
