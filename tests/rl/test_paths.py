"""Relative paths in a config resolve against its folder; the example configs and prompt files ship in the wheel."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tandem.core.errors import ConfigError
from tandem.rl.config import load_config
from tandem.rl.paths import shipped

pytestmark = pytest.mark.slow  # builds a wheel

ROOT = Path(__file__).resolve().parents[2]


def write_config(folder: Path, prompts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "job.yaml"
    config.write_text(f"output_dir: out\nmodel: {{path: /models/x}}\ndata: {{prompts: {prompts}}}\n")
    return config


def test_a_relative_path_in_a_config_means_next_to_the_config(tmp_path, monkeypatch):
    config = write_config(tmp_path / "elsewhere", "prompts.jsonl")
    (tmp_path / "elsewhere" / "prompts.jsonl").write_text('{"prompt": "a cat"}\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(str(config), stage="sample")
    assert cfg.data.prompts == str(tmp_path / "elsewhere" / "prompts.jsonl")
    (tmp_path / "here.jsonl").write_text('{"prompt": "a dog"}\n')  # a command-line value is the working directory's
    assert load_config(str(config), ["data.prompts=here.jsonl"], stage="sample").data.prompts == str(tmp_path / "here.jsonl")


def test_a_path_found_both_beside_the_config_and_here_is_an_error(tmp_path, monkeypatch):
    config = write_config(tmp_path / "elsewhere", "prompts.jsonl")
    (tmp_path / "elsewhere" / "prompts.jsonl").write_text('{"prompt": "a cat"}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a dog"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="data.prompts.*names both.*absolute path"):
        load_config(str(config), stage="sample")


def test_the_shipped_demo_config_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(shipped("tandem.configs.demo", "decoder.yaml")), stage="decoder")
    assert Path(cfg.data.prompts).samefile(shipped("tandem.data", "demo_prompts.jsonl"))


def test_eval_default_prompts_come_from_the_package():
    from tandem.rl.eval import DEFAULT_PROMPTS

    assert DEFAULT_PROMPTS == shipped("tandem.data", "text_eval_prompts.jsonl") and DEFAULT_PROMPTS.is_file()


def test_the_wheel_holds_the_configs_and_data(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ into the folder it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    expected = {f"tandem/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    expected |= {f"tandem/data/{p.name}" for p in (ROOT / "data").glob("*.jsonl")}
    assert "tandem/data/text_eval_prompts.jsonl" in expected and "tandem/configs/demo/decoder.yaml" in expected
    expected |= {f"tandem/{p.relative_to(ROOT)}" for layer in ("core", "rewards", "policies", "rl")
                 for p in (ROOT / layer).rglob("*.py")}  # every module, sub-packages' too
    assert expected <= names, expected - names
