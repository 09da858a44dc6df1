-- Which embedding model the vector columns hold (shared/runtime/vectors.py); both components record theirs here.
CREATE TABLE IF NOT EXISTS embedding_models (
    component   text PRIMARY KEY,
    model       text NOT NULL,
    dim         integer NOT NULL CHECK (dim > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
