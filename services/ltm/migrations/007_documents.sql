-- Long-term memory, v7: documents beside memory (services/ltm/documents/): each user's own collection, chunked,
-- embedded with the memories' model (all-MiniLM-L6-v2, 384 dimensions) and searched like memories (hybrid: exact
-- cosine within the user plus BM25 over english full text). Idempotent.
--
-- Both tables are hash-partitioned by user_id like the other per-user tables (migration 006, docs/partitioning.md),
-- with as many partitions as ltm_memories has; user_id leads every key. Exact search within a user reads the user's chunks through the primary key: no ANN
-- index (filtered by user it returns almost nothing, see 001) and no GIN index on search_tsv (the query scans the
-- user's rows anyway, and a GIN index cannot lead with user_id).

-- One row per document: (user_id, source) is its identity, (user_id, content_hash) keeps one copy of a text.
CREATE TABLE IF NOT EXISTS ltm_documents (
    user_id       text NOT NULL,
    doc_id        uuid NOT NULL,
    source        text NOT NULL,
    title         text NOT NULL,
    format        text NOT NULL,
    content_hash  text NOT NULL,
    chars         integer NOT NULL,
    chunks        integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, doc_id),
    UNIQUE (user_id, source),
    UNIQUE (user_id, content_hash)
) PARTITION BY HASH (user_id);

-- Its chunks: whole sentences under one heading path (heading, outermost first; heading_text: joined by " › ", LABEL_SEP), at
-- most LTM_DOC_CHUNK_TOKENS. search_tsv holds the headings' words as well as the chunk's own.
CREATE TABLE IF NOT EXISTS ltm_doc_chunks (
    user_id     text NOT NULL,
    chunk_id    uuid NOT NULL,
    doc_id      uuid NOT NULL,
    chunk_no    integer NOT NULL,
    heading     text[] NOT NULL DEFAULT '{}',
    heading_text text NOT NULL DEFAULT '',
    content     text NOT NULL,
    tokens      integer NOT NULL,
    embedding   vector(384) NOT NULL,
    search_tsv  tsvector GENERATED ALWAYS AS (
        to_tsvector('english', heading_text || ' ' || content)) STORED,
    PRIMARY KEY (user_id, chunk_id),
    UNIQUE (user_id, doc_id, chunk_no),
    FOREIGN KEY (user_id, doc_id) REFERENCES ltm_documents (user_id, doc_id) ON DELETE CASCADE
) PARTITION BY HASH (user_id);

-- their partitions: the count of ltm_memories' (006), else mesh.partitions, else 16; made once
DO $$
DECLARE
    n int;
    width int;
    t text;
BEGIN
    SELECT count(*) INTO n FROM pg_inherits WHERE inhparent = 'ltm_memories'::regclass;
    IF n = 0 THEN
        n := coalesce(nullif(current_setting('mesh.partitions', true), ''), '16')::int;
    END IF;
    width := greatest(2, length((n - 1)::text));
    FOREACH t IN ARRAY ARRAY['ltm_documents', 'ltm_doc_chunks'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = t::regclass) THEN
            FOR i IN 0 .. n - 1 LOOP
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                               t || '_p' || lpad(i::text, width, '0'), t, n, i);
            END LOOP;
        END IF;
    END LOOP;
END $$;
