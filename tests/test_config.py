"""Configuration: the shipped YAML equals the defaults; errors name the key; --set overrides any key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, run_cli
from wsi_pipeline.config import Config, load_config
from wsi_pipeline.core.errors import ConfigError


def test_shipped_default_yaml_equals_the_defaults() -> None:
    shipped = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert shipped == Config().model_dump(mode="json")
    cfg = load_config(ROOT / "configs" / "default.yaml")
    # resolution and classifier tile size come from the model cards unless set; the dense mitosis net gets 512 px
    assert cfg.tasks.mitosis.mpp is None and cfg.tasks.epithelium_stroma.tile_px is None
    assert cfg.tasks.mitosis.tile_px == 512


def test_set_overrides_and_file_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tasks:\n  metastasis:\n    threshold: 0.7\n")
    cfg = load_config(path, ["tasks.mitosis.tile_px=384", "tissue.pen_filter=false"])
    assert cfg.tasks.metastasis.threshold == 0.7
    assert cfg.tasks.metastasis.overlap_px == 48  # untouched keys keep their defaults
    assert cfg.tasks.mitosis.tile_px == 384 and cfg.tissue.pen_filter is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tasks.mitosis.tile_pz=3"], "tasks.mitosis.tile_pz: unknown key"),
        (["tasks.mitosis.tile_px=-1"], "tasks.mitosis.tile_px: Input should be greater than 0"),
        (["tasks.mitosis.overlap_px=600"], "tasks.mitosis: Value error, overlap_px (600) must be smaller"),
        (["tissue.background=blue"], "tissue.background: Input should be 'auto', 'light' or 'dark'"),
        (["tissue.mask_mpp=abc"], "tissue.mask_mpp: Input should be a valid number"),
        (["nonsense"], "expected KEY=VALUE"),
    ],
)
def test_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert err.value.exit_code == 7


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def test_fingerprint_tracks_changes() -> None:
    a, b = load_config(), load_config(None, ["tasks.mitosis.threshold=0.6"])
    assert a.fingerprint("tissue") == b.fingerprint("tissue")
    assert a.fingerprint("tasks.mitosis") != b.fingerprint("tasks.mitosis")


PLUGIN = """
from pathlib import Path

Path(__file__).with_suffix(".ran").write_text("ran")  # proof that this code ran

from wsi_pipeline.tasks import TaskConfig, TaskResult, register_task


class Marker:
    name = "marker_task"
    config_model = TaskConfig
    cohort_columns = ()
    report_columns = ()
    point_table = None
    trainer = "classifier"

    def default_config(self):
        return TaskConfig(enabled=False)

    def default_model(self):
        return None

    def postprocess(self, context):
        return TaskResult({})


def register():
    register_task(Marker())
"""


def test_config_validates_without_running_the_plugins_it_names(tmp_path: Path) -> None:
    """A configuration's plugins run code; `wsi-pipeline config` (validate and print) does not run them unless
    asked, and says which task sections it could not validate without them."""
    plugin = tmp_path / "marker.py"
    plugin.write_text(PLUGIN)
    config = tmp_path / "config.yaml"
    config.write_text(f"plugins: ['{plugin}:register']\ntasks:\n  marker_task:\n    min_tissue: 0.3\n")
    quiet = run_cli("config", "-c", str(config))
    assert quiet.returncode == 0, quiet.stderr
    assert not plugin.with_suffix(".ran").exists()
    assert (
        "note: plugins not loaded (they run code; --load-plugins loads them); tasks.marker_task not validated"
        in quiet.stderr
    )
    loaded = run_cli("config", "-c", str(config), "--load-plugins")
    assert loaded.returncode == 0 and plugin.with_suffix(".ran").exists(), loaded.stderr
    assert "marker_task:" in loaded.stdout and "min_tissue: 0.3" in loaded.stdout
