-- WordPiece tokens of each memory's content (all-MiniLM-L6-v2's tokenizer, no special tokens), counted at ingest so
-- that a search packs its results under LTM_RESULT_TOKENS without tokenizing them on its event loop. NULL (rows
-- written before, or by a path that does not count): counted at search time, as before.
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS content_tokens integer;
