"""Slide discovery, unique ids and the µm/px override file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from wsi_pipeline.core.errors import ConfigError, UsageError
from wsi_pipeline.run.inputs import assign_ids, discover, read_mpp_file


def test_discover_files_folders_and_globs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("a/x.svs", "a/deep/y.NDPI", "a/notes.txt", "a/.hidden.svs", "b/x.svs", "c/z.tif"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = discover(
        [
            str(tmp_path / "a"),
            str(tmp_path / "b" / "*.svs"),
            str(tmp_path / "c" / "z.tif"),
            str(tmp_path / "missing.svs"),
            str(tmp_path / "a" / "x.svs"),
        ]
    )
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["a/deep/y.NDPI", "a/x.svs", "b/x.svs", "c/z.tif", "missing.svs"]  # sorted per input, unique
    # what is left out is said: the hidden file here, other names of one file below
    said = [r.getMessage() for r in caplog.records]
    assert any("skipped 1 hidden file(s)" in m and ".hidden.svs" in m for m in said), said
    caplog.clear()
    for i in range(64):  # 64 links to one file: one slide, and a word about the other 63
        (tmp_path / "links" / f"l{i:02d}.svs").parent.mkdir(exist_ok=True)
        (tmp_path / "links" / f"l{i:02d}.svs").symlink_to(tmp_path / "c" / "z.tif")
    assert len(discover([str(tmp_path / "links")])) == 1
    assert any("63 path(s) name a slide already given" in r.getMessage() for r in caplog.records)


def test_ids_come_from_the_file_name_alone_and_clashes_are_refused(tmp_path: Path) -> None:
    a, b, z = tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs", tmp_path / "c" / "z.tif"
    assert assign_ids([a, z]) == {a: "x", z: "z"}
    assert assign_ids([a]) == {a: "x"}  # the same id alone as in a batch: nothing depends on the other slides
    with pytest.raises(UsageError, match=r"2 slides would share the output folder x/: .*a/x.svs, .*b/x.svs") as err:
        assign_ids([a, b, z])
    assert err.value.exit_code == 2
    with pytest.raises(UsageError):  # one folder on a case-insensitive disk
        assign_ids([tmp_path / "X.svs", tmp_path / "d" / "x.SVS"])
    accented = assign_ids([tmp_path / "a é b.svs", tmp_path / "a b.svs", tmp_path / "e\u0301.ndpi"])
    assert list(accented.values()) == ["a_é_b", "a_b", "é"]  # letters of any script kept; NFC like macOS names


def test_mpp_file(tmp_path: Path) -> None:
    good = tmp_path / "mpp.csv"
    good.write_text("slide,mpp\nTCGA-1.svs,1.0\ncase-2,0.25\n")
    assert read_mpp_file(good) == {"TCGA-1.svs": 1.0, "case-2": 0.25}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,res\nx,1\n")
    with pytest.raises(ConfigError, match="columns slide,mpp"):
        read_mpp_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_mpp_file(tmp_path / "absent.csv")


def test_shards_partition_the_list() -> None:
    from wsi_pipeline.run.inputs import parse_shard, shard_paths

    paths = [Path(f"s{i:02d}.svs") for i in range(11)]
    parts = [shard_paths(paths, (i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part) == paths
    assert [len(p) for p in parts] == [4, 4, 3]
    assert parts[1] == [Path("s01.svs"), Path("s04.svs"), Path("s07.svs"), Path("s10.svs")]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(UsageError):  # a command-line mistake: exit 2, as the README says
            parse_shard(bad)


def test_output_lock(tmp_path: Path) -> None:
    """A second process cannot write the same folder; shards of one job can, but not the same shard twice."""
    import os
    import subprocess
    import sys
    import textwrap

    from wsi_pipeline.run.lock import OutputLockedError, output_lock

    def other(shard: str) -> subprocess.CompletedProcess[str]:
        code = textwrap.dedent(f"""
            from pathlib import Path
            from wsi_pipeline.run.lock import output_lock, OutputLockedError
            try:
                with output_lock(Path({str(tmp_path)!r}), {shard}):
                    print("got it")
            except OutputLockedError as exc:
                print("locked:", exc)
        """)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    with output_lock(tmp_path):
        result = other("None")
        assert result.stdout.startswith("locked:") and "another run is writing" in result.stdout
        assert f"(pid {os.getpid()} on " in result.stdout
        assert other("(0, 2)").stdout.startswith("locked:")
    assert (tmp_path / ".lock").read_text() == ""  # the holder's name goes with its lock
    # what a SIGKILLed whole run leaves; written before the lock is taken (closing a file drops a process's lock on it)
    (tmp_path / ".lock").write_text("pid 1 on a-node")
    with output_lock(tmp_path, (0, 2)):
        assert other("(1, 2)").stdout.strip() == "got it"
        assert other("(0, 2)").stdout.startswith("locked:")
        whole = other("None").stdout
        assert whole.startswith("locked:") and f"(shard 0-of-2: pid {os.getpid()} on " in whole, whole
    assert other("None").stdout.strip() == "got it"  # released
    assert OutputLockedError.exit_code == 11


def test_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path: Path) -> None:
    """A slide named `=HYPERLINK(...)`, `+1`, `-x` or `@SUM(...)` reaches manifest.csv and cohort_summary.csv with
    a leading `'` (OWASP's rule: shown as text, never run); numbers stay numbers; reading the manifest back (gather,
    submit's table) gives the ids unchanged."""
    from wsi_pipeline.run.cohort import read_manifest_outcomes, write_cohort, write_manifest
    from wsi_pipeline.run.pipeline import SlideOutcome

    names = ['=HYPERLINK("http://x")', "+1+1", "-x", "@SUM(A1)", "plain"]
    outcomes = [SlideOutcome(tmp_path / f"{n}.svs", n, "failed", f"{n}: unreadable", 1.5) for n in names]
    write_manifest(tmp_path / "manifest.csv", outcomes)
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open()))
    assert [r["slide_id"] for r in rows] == ['\'=HYPERLINK("http://x")', "'+1+1", "'-x", "'@SUM(A1)", "plain"]
    assert all(r["error"].startswith("'") for r in rows[:4]) and rows[4]["error"] == "plain: unreadable"
    assert [o.slide_id for o in read_manifest_outcomes(tmp_path).outcomes] == names
    write_cohort(tmp_path / "cohort.csv", [{"slide_id": "=1+1", "mpp": -0.5, "tissue_area_mm2": "-2"}])
    row = next(csv.DictReader((tmp_path / "cohort.csv").open()))
    assert (row["slide_id"], row["mpp"], row["tissue_area_mm2"]) == ("'=1+1", "-0.5", "-2")


def test_stale_temporaries_of_this_host_go_and_another_hosts_stay(tmp_path: Path) -> None:
    """A killed run's temporaries are removed by the next run, judged by their pid; a pid names a process only on
    its own host, so the temporaries of another node sharing OUT (a shard still building a slide) are left alone."""
    from wsi_pipeline.core.atomic import remove_stale_temporaries
    from wsi_pipeline.core.layout import HOST_TAG, temporary_sibling

    mine = temporary_sibling(tmp_path / "case")
    assert HOST_TAG in mine.name and mine.name.startswith(".case.tmp-")
    dead = 999_999_999  # above any pid_max: no such process
    here = tmp_path / f".a.tmp-{dead}-{HOST_TAG}-0a1b2c3d"
    older = tmp_path / f".b.tmp-{dead}-0a1b2c3d"  # made before hosts were recorded: judged as this host's
    elsewhere = tmp_path / f".c.tmp-{dead}-h00000000-0a1b2c3d"
    alive = tmp_path / f".d.tmp-1-{HOST_TAG}-0a1b2c3d"  # pid 1 runs
    for path in (mine, here, older, elsewhere, alive):
        path.mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([here.name, older.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, elsewhere.name, alive.name])
