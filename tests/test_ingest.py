"""Ingest: ids kept as given, timestamps to UTC, bad rows quarantined with file/row/reason, the
accounting identity per source, and fail-fast errors that name the column and key."""

import json

import pandas as pd
import pytest

from embedder.errors import BadDataError, InputError
from embedder.ingest import ingest_events, ingest_items, ingest_user_ids, validate_items
from embedder.parsing import parse_timestamps
from embedder.quarantine import check_bad_fraction
from embedder.sources import read_file
from embedder.specs import ExtraText, ItemMapping, SourceSpec

TEMPLATE = "{title}. {description}"


def _identity(counts):
    return counts.rows_read == counts.accepted + counts.quarantined + counts.duplicates_dropped


def test_items_quarantine_keeps_file_row_and_reason(tmp_path):
    (tmp_path / "a.csv").write_text(
        "item_id,title,description\n"
        "007,Trail shoes,Grippy\n"          # row 1: id with a leading zero stays "007"
        ",No id,Lost\n"                     # row 2: missing id
        "9,  ,   \n"                        # row 3: blank text
        "1e3,Kettle,Boils water\n"          # row 4: numeric-looking id stays "1e3"
    )
    (tmp_path / "b.csv").write_text("item_id,title,description\n007,Trail shoes v2,Grippier\n")
    result = ingest_items(SourceSpec(str(tmp_path / "*.csv"), "items.path"), ItemMapping("item_id", TEMPLATE))
    assert sorted(result.rows["item_id"]) == ["007", "1e3"]
    # the later file's row wins for a duplicated id, and the drop is counted
    assert result.rows.set_index("item_id").loc["007", "text"] == "Trail shoes v2. Grippier"
    q = result.quarantine.sort_values("row")
    assert q["reason"].tolist() == ["missing_id", "empty_text"]
    assert q["row"].tolist() == [2, 3]
    assert all(s.endswith("a.csv") for s in q["source"])
    assert json.loads(q.iloc[0]["record"])["title"] == "No id"
    assert result.counts.duplicates_dropped == 1 and result.counts.conflicting_duplicates == 1
    assert result.counts.rows_read == 5 and _identity(result.counts)


@pytest.mark.parametrize("on_cluster", [False, True])
def test_dask_ingest_matches_single_process(tmp_path, sample_dir, request, on_cluster):
    """Oracle: one pandas pass over all rows gives the same accepted items, in the same order, as the
    partitioned read (on a Dask cluster the partitions are collected one at a time)."""
    from contextlib import nullcontext

    items = pd.read_parquet(sample_dir / "items.parquet")
    for i, part in enumerate([items.iloc[:100], items.iloc[100:170], items.iloc[170:]]):
        part.to_parquet(tmp_path / f"part-{i}.parquet", index=False)
    with request.getfixturevalue("dask_client").as_current() if on_cluster else nullcontext():
        result = ingest_items(SourceSpec(str(tmp_path / "part-*.parquet"), "items.path"),
                              ItemMapping("item_id", TEMPLATE, ("category",)))
    whole = read_file(str(sample_dir / "items.parquet"), SourceSpec("x", "items.path"))
    single = validate_items(whole, ItemMapping("item_id", TEMPLATE, ("category",)))
    single = single[single["_reason"].isna()]
    assert result.rows["item_id"].tolist() == single["item_id"].tolist()
    assert result.rows["text"].tolist() == single["text"].tolist()


def test_missing_column_names_column_key_and_found_columns(tmp_path):
    (tmp_path / "items.csv").write_text("id,name\n1,x\n")
    with pytest.raises(InputError) as err:
        ingest_items(SourceSpec(str(tmp_path / "items.csv"), "items.path"), ItemMapping("id", "{title}"))
    message = str(err.value)
    assert "column 'title' not found" in message
    assert "items.text" in message and "columns found: id, name" in message


def test_no_matching_file_names_key_and_path(tmp_path):
    with pytest.raises(InputError, match=r"items.path: no file matches .*nothing-\*\.csv"):
        ingest_items(SourceSpec(str(tmp_path / "nothing-*.csv"), "items.path"), ItemMapping("id", "{title}"))


def test_timestamps_to_utc():
    values = pd.Series([1_700_000_000, 1_700_000_000_000, "2023-11-14T23:13:20+01:00", "2023-11-14 22:13:20",
                        "2023-11-14T22:13:20Z", "yesterday", None], dtype=object)
    parsed = parse_timestamps(values, timezone="Europe/Paris")
    assert parsed[0] == parsed[1] == pd.Timestamp("2023-11-14T22:13:20Z")
    assert parsed[2] == pd.Timestamp("2023-11-14T22:13:20Z")
    assert parsed[3] == pd.Timestamp("2023-11-14T21:13:20Z")  # naive, read in Paris time (UTC+1 in November)
    assert parsed[4] == pd.Timestamp("2023-11-14T22:13:20Z")
    assert pd.isna(parsed[5]) and pd.isna(parsed[6])


def test_datetime_values_to_utc_like_strings():
    """Values that are already datetimes (a Parquet timestamp column read with other values) follow
    the same rules as strings: an offset is kept, a naive time is read in the zone, and a naive time
    that the zone repeats (the autumn clock change) cannot be placed."""
    values = pd.Series([pd.Timestamp("2023-11-14T23:13:20+01:00"), pd.Timestamp("2023-11-14 22:13:20"),
                        pd.Timestamp("2023-11-14T22:13:20", tz="UTC"), pd.Timestamp("2023-10-29 02:30:00"),
                        "2023-11-14 22:13:20", 1_700_000_000], dtype=object)
    parsed = parse_timestamps(values, timezone="Europe/Paris")
    assert parsed[0] == parsed[2] == parsed[5] == pd.Timestamp("2023-11-14T22:13:20Z")
    assert parsed[1] == parsed[4] == pd.Timestamp("2023-11-14T21:13:20Z")  # naive: Paris time
    assert pd.isna(parsed[3])  # 02:30 happened twice in Paris that night
    assert str(parsed.dtype) == "datetime64[us, UTC]"  # microseconds: a year-9999 typo is a value to judge, not an overflow


def test_events_quarantine_and_duplicates(tmp_path):
    (tmp_path / "events.csv").write_text(
        "user,item,ts,kind\n"
        "u1,A,1700000000,view\n"
        "u1,A,1700000000,view\n"           # exact duplicate: dropped, counted
        "u2,A,not a time,view\n"           # bad timestamp
        "u3,Z,1700000000,view\n"           # unknown item
        "u4,A,1700000000,like\n"           # unknown event type
        ",A,1700000000,view\n"             # missing user
        "u5,A,100,view\n"                  # 1970: impossible
    )
    cols = {"user_id": "user", "item_id": "item", "timestamp": "ts", "event_type": "kind"}
    result = ingest_events(SourceSpec(str(tmp_path / "events.csv"), "events.path"), cols, {"view": 1.0, "cart": 3.0}, {"A"})
    assert result.rows[["user_id", "item_id", "event_type"]].values.tolist() == [["u1", "A", "view"]]
    assert str(result.rows["ts"].dt.tz) == "UTC"
    reasons = dict(zip(result.quarantine["row"], result.quarantine["reason"]))
    assert reasons == {3: "bad_timestamp", 4: "unknown_item", 5: "unknown_event_type", 6: "missing_user_id",
                       7: "impossible_timestamp"}
    assert "allowed: view, cart" in result.quarantine.set_index("row").loc[5, "detail"]
    assert result.counts.duplicates_dropped == 1 and _identity(result.counts)


GENRES = ["unknown", "Action", "Adventure", "Animation", "Comedy"]


def test_headerless_latin1_pipe_file_with_one_hot_genres(tmp_path):
    """The shape of ml-100k's u.item: no header, '|'-separated, Latin-1, genres as 0/1 columns."""
    rows = ["1|Toy Story (1995)|01-Jan-1995||http://x/1|0|0|1|1|1",
            "2|Café Society (1995)|01-Jan-1995||http://x/2|0|1|0|0|0",
            "3||01-Jan-1995||http://x/3|0|0|0|0|0"]  # no title and no genre: empty text
    (tmp_path / "u.item").write_bytes("\n".join(rows).encode("latin-1"))
    spec = SourceSpec(str(tmp_path / "u.item"), "items.path", "csv", "|", "latin-1",
                      ("movie_id", "title", "release", "video_release", "url", *GENRES))
    mapping = ItemMapping("movie_id", "{title}. Genres: {genres}.", ("title", "genres"), flags={"genres": GENRES})
    result = ingest_items(spec, mapping)
    texts = dict(zip(result.rows["item_id"], result.rows["text"]))
    assert texts == {"1": "Toy Story (1995). Genres: Adventure, Animation, Comedy.",
                     "2": "Café Society (1995). Genres: Action."}
    assert result.rows.set_index("item_id").loc["2", "genres"] == "Action"
    assert result.quarantine[["row", "reason"]].values.tolist() == [[3, "empty_text"]]


def test_list_separators_and_folded_tags(tmp_path):
    """The shape of ml-latest-small: genres 'A|B', tags in another file folded into the text."""
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"Heat, Remastered (1995)",Action|Crime|Thriller\n2,Up (2009),Animation\n')
    (tmp_path / "tags.csv").write_text("userId,movieId,tag\n1,1,heist\n2,1,Heist\n3,1,  Al Pacino \n4,2,\n5,,orphan\n")
    tags = ExtraText(SourceSpec(str(tmp_path / "tags.csv"), "items.extra_text.tags.path"), "movieId", "tag")
    mapping = ItemMapping("movieId", "{title}. {genres}. Tags: {tags}", list_separators={"genres": "|"},
                          extra_text={"tags": tags})
    result = ingest_items(SourceSpec(str(tmp_path / "movies.csv"), "items.path"), mapping)
    texts = dict(zip(result.rows["item_id"], result.rows["text"]))
    assert texts["1"] == "Heat, Remastered (1995). Action, Crime, Thriller. Tags: heist, Al Pacino"
    assert texts["2"] == "Up (2009). Animation. Tags:"
    assert result.counts.extra_text_rows_without_id_or_value == {"tags": 2}


def test_newest_by_keeps_the_latest_version_and_reports_conflicts(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        '{"id": "A", "title": "new", "updated": "2026-11-02T00:00:00Z"}\n'
        '{"id": "A", "title": "old", "updated": "2026-11-01T00:00:00Z"}\n'
        '{"id": "B", "title": "same", "updated": 1}\n'
        '{"id": "B", "title": "same", "updated": 2}\n'
        '{"id": ["not", "an", "id"], "title": "x", "updated": 3}\n')
    result = ingest_items(SourceSpec(str(tmp_path / "items.jsonl"), "items.path"),
                          ItemMapping("id", "{title}", newest_by="updated"))
    assert dict(zip(result.rows["item_id"], result.rows["text"])) == {"A": "new", "B": "same"}
    assert result.counts.duplicates_dropped == 2
    assert result.counts.conflicting_duplicates == 1 and result.counts.conflicting_ids == ["A"]
    assert result.quarantine["reason"].tolist() == ["wrong_type"] and _identity(result.counts)


def test_float_and_int_ids_from_parquet_read_as_given(tmp_path):
    pd.DataFrame({"id": [7.0, 8.0, float("nan")], "title": ["a", "b", "c"]}).to_parquet(tmp_path / "f.parquet")
    pd.DataFrame({"id": [7, 9], "title": ["a", "d"]}).to_parquet(tmp_path / "i.parquet")
    floats = ingest_items(SourceSpec(str(tmp_path / "f.parquet"), "items.path"), ItemMapping("id", "{title}"))
    ints = ingest_items(SourceSpec(str(tmp_path / "i.parquet"), "items.path"), ItemMapping("id", "{title}"))
    assert floats.rows["item_id"].tolist() == ["7", "8"] and floats.quarantine["reason"].tolist() == ["missing_id"]
    assert ints.rows["item_id"].tolist() == ["7", "9"]


def test_undecodable_bytes_quarantine_the_row_not_the_file(tmp_path):
    (tmp_path / "items.csv").write_bytes(b"item_id,title\n1,Caf\xe9 au lait\n2,Tea\n3,Na\xefve\n")
    result = ingest_items(SourceSpec(str(tmp_path / "items.csv"), "items.path"), ItemMapping("item_id", "{title}"))
    assert result.rows["item_id"].tolist() == ["2"]
    q = result.quarantine.sort_values("row")
    assert q["reason"].tolist() == ["undecodable_bytes"] * 2 and q["row"].tolist() == [1, 3]
    assert json.loads(q.iloc[0]["record"])["title"] == "Caf\ufffd au lait"  # where the bad byte was
    assert "encoding" in q.iloc[0]["detail"] and _identity(result.counts)
    # the same file read as Latin-1, as configured for it, loses nothing
    latin = ingest_items(SourceSpec(str(tmp_path / "items.csv"), "items.path", encoding="latin-1"),
                         ItemMapping("item_id", "{title}"))
    assert latin.rows["text"].tolist() == ["Café au lait", "Tea", "Naïve"]


def test_malformed_json_lines_are_quarantined_with_their_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "A", "title": "ok"}\n{"id": "B", "title": \n\n[1, 2]\n{"id": "C", "title": "fine"}\n')
    (tmp_path / "b.jsonl").write_text('not json at all\n')  # a file with no usable line
    result = ingest_items(SourceSpec(str(tmp_path / "*.jsonl"), "items.path"), ItemMapping("id", "{title}"))
    assert result.rows["item_id"].tolist() == ["A", "C"]
    q = result.quarantine
    assert q["reason"].tolist() == ["malformed_line"] * 3
    assert [(s.rsplit("/", 1)[1], r) for s, r in zip(q["source"], q["row"])] == [("a.jsonl", 2), ("a.jsonl", 4), ("b.jsonl", 1)]
    assert json.loads(q.iloc[0]["record"])["_malformed_line"] == '{"id": "B", "title": '
    assert _identity(result.counts)


def test_users_source_gets_the_same_row_checks(tmp_path):
    (tmp_path / "users.csv").write_bytes(b"user_id\nU1\nU\xe92\n\nU1\nU3\n")
    result = ingest_user_ids(SourceSpec(str(tmp_path / "users.csv"), "users.path"), "user_id")
    assert result.rows["user_id"].tolist() == ["U1", "U3"]
    assert result.quarantine[["row", "reason"]].values.tolist() == [[2, "undecodable_bytes"]]
    assert result.counts.quarantine_reasons == {"undecodable_bytes": 1}
    assert result.counts.duplicates_dropped == 1 and _identity(result.counts)
    with pytest.raises(BadDataError, match="users: 25.0% of rows quarantined .* top reasons: undecodable_bytes 1"):
        check_bad_fraction("users", result.counts, 0.01)
