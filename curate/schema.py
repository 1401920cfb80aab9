"""The normalized post schema every source produces, and the manifest schema.

Post columns are docs/design.md's manifest columns that describe the source post, plus
what selection needs (is_deleted, is_banned, parent_id, file_ext, ...). Stage
columns (path, phash, caption, ...) are added by the stages that own them.
"""

import pyarrow as pa

TAG_CATEGORIES = ("general", "character", "copyright", "artist", "meta")
TAG_COLUMNS = tuple(f"tags_{c}" for c in TAG_CATEGORIES)
RATINGS = ("g", "s", "q", "e")

tags_type = pa.list_(pa.string())
variant_type = pa.struct(
    [("type", pa.string()), ("url", pa.string()), ("width", pa.int32()),
     ("height", pa.int32()), ("file_ext", pa.string())]
)

POST_FIELDS = [
    pa.field("post_id", pa.int64()),
    pa.field("md5", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("rating", pa.string()),
    pa.field("fav_count", pa.int32()),
    pa.field("score", pa.int32()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    *[pa.field(c, tags_type) for c in TAG_COLUMNS],
    pa.field("file_url", pa.string()),
    pa.field("file_ext", pa.string()),
    pa.field("file_size", pa.int64()),
    pa.field("parent_id", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("is_deleted", pa.bool_()),
    pa.field("is_banned", pa.bool_()),
    pa.field("is_pending", pa.bool_()),
    pa.field("variants", pa.list_(variant_type)),
]
POST_SCHEMA = pa.schema(POST_FIELDS)

tagger_type = pa.list_(
    pa.struct([("tag", pa.string()), ("category", pa.string()), ("score", pa.float32())])
)

# Columns owned by the stages after selection (download, dedupe, crop, tag, caption).
STAGE_FIELDS = [
    pa.field("path", pa.string()),
    pa.field("source_path", pa.string()),
    pa.field("error", pa.string()),
    pa.field("phash", pa.string()),  # 16 hex digits: exact in every reader (a nullable int64 is float64 in pandas)
    pa.field("dup_of", pa.string()),
    pa.field("crop", pa.list_(pa.int32())),
    pa.field("tagger", tagger_type),
    pa.field("caption", pa.string()),
    pa.field("user_caption", pa.string()),    # the user's sidecar .txt/.caption, read at ingest
    pa.field("caption_file", pa.string()),    # the file the caption stage wrote (relative path)
    pa.field("caption_sha256", pa.string()),  # ... and the digest of what it wrote there
]

MANIFEST_SCHEMA = pa.schema(
    [pa.field("key", pa.string(), nullable=False), pa.field("subset", pa.string())]
    + POST_FIELDS
    + STAGE_FIELDS
)

HEX64_FIELDS = ("phash",)  # int64 before issue 17; read back as hex (`hex64`)


def hex64(col) -> pa.Array:
    """An int64 hash column (manifests before issue 17) -> 16 hex digits, nulls kept."""
    mask = (1 << 64) - 1
    return pa.array([None if v is None else f"{v & mask:016x}" for v in col.to_pylist()], pa.string())
