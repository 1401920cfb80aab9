"""A generated Danbooru-like corpus for the offline demo, tests and benchmarks.

Realistic where selection cares: Zipf-distributed tag popularity, ~30-40 tags a
post, `1girl` on ~60% and `solo` on ~50% of posts, heavy-tailed fav_count, a
spread of sizes and orientations, some deleted/banned posts, a few artists per
copyright. Posts are API-shaped dicts (what /posts.json returns), and
`write_hakubooru_db` stores them in HakuBooru's real SQLite schema.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

COPYRIGHTS = ["blue_archive", "original", "genshin_impact", "hololive", "arknights", "touhou",
              "fate/grand_order", "kantai_collection", "idolmaster", "pokemon"]
COUNT_TAGS = [("highres", 0.45), ("long_hair", 0.40),
              ("looking_at_viewer", 0.35), ("smile", 0.30), ("blush", 0.30), ("multiple_girls", 0.15),
              ("2girls", 0.08), ("1boy", 0.12), ("comic", 0.04), ("monochrome", 0.05),
              ("sketch", 0.03), ("greyscale", 0.04), ("text_focus", 0.01)]
EXTS = ["jpg"] * 70 + ["png"] * 25 + ["webp", "gif", "zip", "mp4", "webm"]

# HakuBooru's schema as peewee creates it (hakubooru/dataset/db.py).
HAKUBOORU_SCHEMA = """
CREATE TABLE "tag" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL,
  "type" INTEGER NOT NULL, "popularity" INTEGER NOT NULL);
CREATE UNIQUE INDEX "tag_name" ON "tag" ("name");
CREATE TABLE "post" ("id" INTEGER NOT NULL PRIMARY KEY, "created_at" VARCHAR(255) NOT NULL,
  "uploader_id" INTEGER NOT NULL, "source" VARCHAR(255) NOT NULL, "md5" VARCHAR(255),
  "parent_id" INTEGER, "has_children" INTEGER NOT NULL, "is_deleted" INTEGER NOT NULL,
  "is_banned" INTEGER NOT NULL, "pixiv_id" INTEGER, "has_active_children" INTEGER NOT NULL,
  "bit_flags" INTEGER NOT NULL, "has_large" INTEGER NOT NULL, "has_visible_children" INTEGER NOT NULL,
  "image_width" INTEGER NOT NULL, "image_height" INTEGER NOT NULL, "file_size" INTEGER NOT NULL,
  "file_ext" VARCHAR(255) NOT NULL, "rating" INTEGER NOT NULL, "score" INTEGER NOT NULL,
  "up_score" INTEGER NOT NULL, "down_score" INTEGER NOT NULL, "fav_count" INTEGER NOT NULL,
  "file_url" VARCHAR(255), "large_file_url" VARCHAR(255), "preview_file_url" VARCHAR(255));
CREATE TABLE "posttagrelation" ("id" INTEGER NOT NULL PRIMARY KEY, "post_id" INTEGER NOT NULL,
  "tag_id" INTEGER NOT NULL, FOREIGN KEY ("post_id") REFERENCES "post" ("id"),
  FOREIGN KEY ("tag_id") REFERENCES "tag" ("id"));
CREATE INDEX "posttagrelation_post_id" ON "posttagrelation" ("post_id");
CREATE INDEX "posttagrelation_tag_id" ON "posttagrelation" ("tag_id");
"""
HAKU_TYPE = {"general": 0, "artist": 1, "character": 2, "copyright": 3, "meta": 4}
RATING_CODE = {"g": 0, "s": 1, "q": 2, "e": 3}


class Vocabulary:
    """Tag names by category, with Zipf weights for the general ones."""

    def __init__(self, n_general: int = 5000, n_artists: int = 400, n_characters: int = 300, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.general = [f"tag_{i}" for i in range(n_general)]
        weights = 1.0 / np.arange(1, n_general + 1) ** 1.1
        self.general_p = weights / weights.sum()
        self.artists = [f"artist_{i}" for i in range(n_artists)]
        aw = 1.0 / np.arange(1, n_artists + 1) ** 0.9  # a few prolific artists, a long tail
        self.artist_p = aw / aw.sum()
        self.artist_copyright = rng.integers(0, len(COPYRIGHTS), n_artists)
        self.characters = [f"character_{i}_({COPYRIGHTS[i % len(COPYRIGHTS)].split('/')[0]})" for i in range(n_characters)]


def make_posts(n: int, seed: int = 0, start_id: int = 1, vocab: Vocabulary | None = None) -> list[dict]:
    """`n` API-shaped posts with ids from start_id (gaps included, as on the site)."""
    rng = np.random.default_rng(seed)
    vocab = vocab or Vocabulary()
    ids = start_id + np.cumsum(rng.integers(1, 4, n)) - 1
    t0 = datetime(2015, 1, 1, tzinfo=timezone.utc)
    posts = []
    for pid in ids.tolist():
        general = set(rng.choice(vocab.general, size=int(rng.integers(20, 34)), replace=False, p=vocab.general_p).tolist())
        general |= {t for t, p in COUNT_TAGS if rng.random() < p and t != "highres"}
        if rng.random() < 0.60:  # 1girl on ~60%, solo on ~50%, mostly together
            general.add("1girl")
            if rng.random() < 0.75:
                general.add("solo")
        elif rng.random() < 0.12:
            general.add("solo")
        meta = {"highres"} if rng.random() < 0.45 else set()
        a = int(rng.choice(len(vocab.artists), p=vocab.artist_p))
        artist = {vocab.artists[a]} if rng.random() < 0.95 else set()
        copyright = {COPYRIGHTS[vocab.artist_copyright[a]] if rng.random() < 0.7 else COPYRIGHTS[int(rng.integers(0, len(COPYRIGHTS)))]}
        character = {vocab.characters[int(rng.integers(0, len(vocab.characters)))]} if rng.random() < 0.7 else set()
        long_side = int(rng.integers(600, 4000))
        ratio = float(rng.choice([0.56, 0.67, 0.75, 1.0, 1.33, 1.5, 1.78]))
        w, h = (long_side, int(long_side / ratio)) if ratio >= 1 else (int(long_side * ratio), long_side)
        ext = str(rng.choice(EXTS))
        md5 = f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}"
        created = t0 + timedelta(minutes=int(pid) * 3)
        tags = {"general": general, "artist": artist, "copyright": copyright, "character": character, "meta": meta}
        posts.append({
            "id": pid, "created_at": created.isoformat(), "updated_at": (created + timedelta(days=1)).isoformat(),
            "uploader_id": int(rng.integers(1, 10**6)), "score": int(rng.pareto(1.3) * 8),
            "fav_count": int(rng.pareto(1.1) * 14), "source": f"https://example.invalid/{pid}", "md5": md5,
            "rating": str(rng.choice(["g", "s", "q", "e"], p=[0.45, 0.35, 0.12, 0.08])),
            "image_width": w, "image_height": h, "file_ext": ext, "file_size": int(w * h * 0.3),
            "parent_id": None, "has_children": False, "is_pending": False, "is_flagged": False,
            "is_deleted": bool(rng.random() < 0.03), "is_banned": bool(rng.random() < 0.005),
            "tag_string": " ".join(sorted(set().union(*tags.values()))),
            **{f"tag_string_{c}": " ".join(sorted(v)) for c, v in tags.items()},
            "file_url": f"https://cdn.donmai.us/original/{md5[:2]}/{md5[2:4]}/{md5}.{ext}",
            "large_file_url": f"https://cdn.donmai.us/sample/{md5[:2]}/{md5[2:4]}/sample-{md5}.jpg",
        })
    return posts


def write_hakubooru_db(posts: list[dict], path: str | Path) -> Path:
    """Store API-shaped posts in a HakuBooru database (its real table layout)."""
    path = Path(path)
    db = sqlite3.connect(path)
    db.executescript(HAKUBOORU_SCHEMA)
    tag_ids: dict[str, int] = {}
    tag_rows, post_rows, rel_rows = [], [], []
    for p in posts:
        for cat, code in HAKU_TYPE.items():
            for name in (p.get(f"tag_string_{cat}") or "").split():
                if name not in tag_ids:
                    tag_ids[name] = len(tag_ids) + 1
                    tag_rows.append((tag_ids[name], name, code, 0))
                rel_rows.append((p["id"], tag_ids[name]))
        post_rows.append((
            p["id"], p["created_at"], p.get("uploader_id", 0), p.get("source") or "", p.get("md5"),
            p.get("parent_id"), 0, int(bool(p.get("is_deleted"))), int(bool(p.get("is_banned"))), None, 0, 0, 1, 0,
            p["image_width"], p["image_height"], p.get("file_size", 0), p["file_ext"], RATING_CODE[p["rating"]],
            p.get("score", 0), 0, 0, p.get("fav_count", 0), p.get("file_url"), p.get("large_file_url"), None,
        ))
    db.executemany("INSERT INTO tag VALUES (?,?,?,?)", tag_rows)
    db.executemany(f"INSERT INTO post VALUES ({','.join('?' * 26)})", post_rows)
    db.executemany("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?,?)", rel_rows)
    db.commit()
    db.close()
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m curate.demo.synthetic OUT_DIR [--posts N]`: a demo corpus on disk:
    posts.jsonl (a dump), danbooru.db (HakuBooru) and tag_aliases.json."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--posts", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    posts = make_posts(args.posts, seed=args.seed)
    with open(args.out / "posts.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in posts)
    (args.out / "danbooru.db").unlink(missing_ok=True)
    write_hakubooru_db(posts, args.out / "danbooru.db")
    aliases = [{"id": 1, "antecedent_name": "solo_female", "consequent_name": "1girl", "status": "active"},
               {"id": 2, "antecedent_name": "monochrome_(medium)", "consequent_name": "monochrome", "status": "active"}]
    (args.out / "tag_aliases.json").write_text(json.dumps(aliases))
    print(f"{len(posts)} posts -> {args.out}/posts.jsonl, {args.out}/danbooru.db, {args.out}/tag_aliases.json")


if __name__ == "__main__":
    main()
