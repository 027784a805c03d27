"""Bad input files are one line (ConfigError), images are converted faithfully and say so."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.core.data import load_image, load_prompts
from tandem.core.errors import ConfigError

pytestmark = pytest.mark.slow  # CLI subprocesses and jobs


# ------------------------------------------------------------------ prompt files and references
def test_non_utf8_prompt_file_is_one_line(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes("un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_prompts(str(bad))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_reference_outside_the_prompt_folder_is_refused_unless_allowed(tmp_path, where):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    folder = tmp_path / "prompts"
    folder.mkdir()
    ref = "../secret.png" if where == "parent" else str(secret)
    (folder / "p.jsonl").write_text(json.dumps({"prompt": "x", "reference": ref}) + "\n")
    with pytest.raises(ConfigError, match="data.allowed_roots"):
        load_prompts(str(folder / "p.jsonl"))
    records = load_prompts(str(folder / "p.jsonl"), allowed_roots=[str(tmp_path)])
    assert records[0].metadata["reference"][0, 0].tolist() == [1, 2, 3]



@pytest.mark.parametrize("suffix, text", [(".txt", "a red apple\nsecond\n"), (".jsonl", '{"prompt": "a red apple"}\n')])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix, text):
    path = tmp_path / f"p{suffix}"
    path.write_bytes("\ufeff".encode() + text.encode())  # what Notepad's "UTF-8 with BOM" writes
    assert load_prompts(str(path))[0].prompt == "a red apple"


@pytest.mark.parametrize("region", [[100, 100, 400, 400], [0.8, 0.2, 0.2, 0.8], [0, 0, 1], "0 0 1 1"])
def test_edit_region_outside_fractions_is_one_line(tmp_path, region):
    Image.new("RGB", (16, 16)).save(tmp_path / "src.png")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "reference": "src.png", "edit_region": region}) + "\n")
    line = assert_user_mistake(tandem_cli("score", "--reward", "source_structure", "--images", tmp_path / "images",
                               "--prompts", tmp_path / "p.jsonl"))
    assert "p.jsonl:1: edit_region" in line and "fractions" in line
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "reference": "src.png", "edit_region": [0, 0.5, 1, 1.0]}) + "\n")
    assert load_prompts(str(tmp_path / "p.jsonl"))[0].metadata["edit_region"] == [0, 0.5, 1, 1.0]

# ------------------------------------------------------------------ images
def png_bytes(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grey_keeps_its_level(tmp_path, caplog):
    path = tmp_path / "grey16.png"
    path.write_bytes(png_bytes(np.full((4, 4), 32896, np.uint16)))  # 32896 / 257 = 128: mid-grey
    with caplog.at_level("INFO", logger="tandem.data"):
        image = load_image(path)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8 and (image == 128).all()
    assert "16-bit" in caplog.text


def test_alpha_is_composited_on_white_and_logged(tmp_path, caplog):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 255, 0, 128  # opaque, transparent, half
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(rgba, "RGBA"))
    with caplog.at_level("WARNING", logger="tandem.data"):
        image = load_image(path)
    assert image[0, 0].tolist() == [255, 0, 0] and image[0, 1].tolist() == [255, 255, 255]
    assert image[1, 0, 0] == 255 and abs(int(image[1, 0, 1]) - 127) <= 1
    assert "alpha channel composited on white" in caplog.text


def test_grayscale_conversion_is_logged(tmp_path, caplog):
    path = tmp_path / "g.png"
    path.write_bytes(png_bytes(np.full((2, 2), 77, np.uint8)))
    with caplog.at_level("INFO", logger="tandem.data"):
        assert (load_image(path) == 77).all()
    assert "grayscale" in caplog.text


def bomb_png(width, height) -> bytes:
    """A valid 1x1 grey PNG whose header claims width x height pixels (a decompression bomb's header)."""
    raw = png_bytes(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[8 + 25:]


def test_decompression_bomb_in_score_is_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "p.txt").write_text("a prompt\n")
    line = assert_user_mistake(tandem_cli("score", "--reward", "color", "--images", str(images), "--prompts", str(tmp_path / "p.txt")))
    assert "bomb.png" in line and "decompression bomb" in line


@pytest.mark.parametrize("content, reason", [
    (png_bytes(np.zeros((64, 64, 3), np.uint8))[:-40], "image file is truncated"),  # PIL: OSError, said as "OSError"
    (b"not an image", "PIL cannot identify it as an image"),
], ids=["truncated", "not an image"])
def test_an_unreadable_image_names_the_file_and_the_reason(tmp_path, content, reason):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(content)
    (tmp_path / "p.txt").write_text("a prompt\n")
    line = assert_user_mistake(tandem_cli("score", "--reward", "color", "--images", images, "--prompts", tmp_path / "p.txt"))
    assert f"cannot read image {images / 'broken.png'}: {reason}" in line

# ------------------------------------------------------------------ output_dir, report
def test_output_dir_that_is_a_file_is_one_line_before_models_load(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    line = assert_user_mistake(tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={target}",
                        f"model.path={tmp_path / 'no-model-needed'}"))
    assert "output_dir" in line and "is a file" in line


def test_unwritable_output_dir_is_one_line(tmp_path):
    line = assert_user_mistake(tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", "output_dir=/proc/tandem-run",
                        f"model.path={tmp_path / 'no-model-needed'}"))
    assert "output_dir /proc/tandem-run is not writable" in line


def write_run(folder, metrics_lines, eval_meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("output_dir: x\n")
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics_lines))
    if eval_meta is not None:
        (folder / "eval").mkdir()
        stats = {"n": "<b>2</b>", "words": 2, "word_accuracy": 0.5, "one_minus_ned": 0.5, "ned": 0.5}
        (folder / "eval" / "text_eval.json").write_text(json.dumps(
            {"meta": eval_meta, "per_language": {"<i>en</i>": stats}, "overall": stats}))
    return folder


@pytest.mark.parametrize("given, what", [("run", "is a run folder, not a checkpoint"),
                                         ("run/checkpoints/step_9", "does not exist"),
                                         ("run/checkpoints", "is not a checkpoint folder")])
def test_export_of_what_is_not_a_checkpoint_names_the_runs_checkpoints(tmp_path, given, what):
    run = write_run(tmp_path / "run", ['{"step": 1}'])
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step}" / "state.json").write_text("{}")
    line = assert_user_mistake(tandem_cli("export", tmp_path / given, tmp_path / "out"))
    assert f"export: {tmp_path / given} {what}" in line and "--config" not in line
    assert f"the run's checkpoints: {run / 'checkpoints' / 'step_2'}, {run / 'checkpoints' / 'step_4'}" in line

def test_report_on_a_metrics_line_without_step_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", ['{"step": 1, "reward/mean": 0.1}', '{"reward/mean": 0.2}'])
    line = assert_user_mistake(tandem_cli("report", str(run)))
    assert "metrics.jsonl:2" in line and "'step'" in line
    assert not (run / "report.html").exists()


def test_report_escapes_everything(tmp_path):
    from tandem.rl.report import write_report

    script = "<script>alert(1)</script>"
    meta = {"checkpoint": script, "prompts": script, "height": script, "width": 64, "num_steps": script, "seed": script}
    run = write_run(tmp_path / "run", ['{"step": 1, "reward/mean": 0.1, "time/' + script + '": 1.0}'], eval_meta=meta)
    page = write_report(str(run)).read_text()
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page


# ------------------------------------------------------------------ buffer shards
def shard(folder, header=None, raw_header=None, tensors=None):
    from tandem.rl.buffer import FORMAT, VERSION

    folder.mkdir(parents=True, exist_ok=True)
    base = {"format": FORMAT, "version": VERSION, "height": 64, "width": 64, "payload": ["full_tokens"],
            "rewards": {}, "prompts": ["a", "b"], "metadata": [{}, {}]}
    base.update(header or {})
    tensors = tensors if tensors is not None else {"full_tokens": torch.zeros(2, 4, dtype=torch.int64)}
    save_file(tensors, str(folder / "shard_000000.safetensors"),
              metadata={"tandem_buffer": raw_header if raw_header is not None else json.dumps(base)})
    return folder


@pytest.mark.parametrize("case, kwargs, message", [
    ("bad json", {"raw_header": "{not json"}, "not valid JSON"),
    ("missing keys", {"header": {"prompts": None}}, "must be lists"),
    ("no prompts key", {"raw_header": json.dumps({"format": "tandem-buffer", "version": 1})}, "header lacks"),
    ("short rows", {"tensors": {"full_tokens": torch.zeros(1, 4, dtype=torch.int64)}}, "must hold 2 rows"),
    ("negative ids", {"tensors": {"full_tokens": -torch.ones(2, 4, dtype=torch.int64)}}, "non-negative ids"),
    ("missing tensor", {"tensors": {"other": torch.zeros(2, 4, dtype=torch.int64)}}, "'full_tokens' named in its header is missing"),
])
def test_malformed_buffer_shards_are_one_line(tmp_path, case, kwargs, message):
    from tandem.rl.buffer import load_buffer_records

    folder = shard(tmp_path / "run" / "buffer", **kwargs)
    with pytest.raises(ConfigError, match=message):
        load_buffer_records(str(folder.parent), 64, 64)


def test_buffer_reference_path_is_confined_to_the_run(tmp_path):
    from tandem.rl.buffer import load_buffer_records

    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    folder = shard(tmp_path / "run" / "buffer", header={"metadata": [{"reference_path": str(tmp_path / "outside.png")}, {}]})
    with pytest.raises(ConfigError, match="data.allowed_roots"):
        load_buffer_records(str(folder.parent), 64, 64)
    assert load_buffer_records(str(folder.parent), 64, 64, allowed_roots=[str(tmp_path)])[0].metadata["reference"].shape == (64, 64, 3)


# ------------------------------------------------------------------ rewards that are never numbers
@pytest.mark.parametrize("fn, message", [
    ("infinite", "reward 'infinite' failed on 8/8 samples"),  # +inf: not a number, counted as a failure
    ("nothing", "reward 'nothing' scored none of the 8 samples"),  # all None: no training signal
])
def test_a_reward_that_never_gives_a_number_stops_the_job_naming_it(tiny_path, tmp_path, plugin_path, fn, message):
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'run'}",
                      f"model.path={tiny_path}", "max_steps=50", "logging.progress=false", "logging.sample_every=0",
                      "reward_host.backend=local", "reward_host.max_failed_rollouts=2", "decoder.num_steps=4",
                      "decoder.sde_window_range=[0,3]", f"rewards=[{{fn: 'tests.reward_plugins:{fn}'}}]")
    assert_user_mistake(proc, message, "consecutive rollouts", code=1, only="tandem:")



# ------------------------------------------------------------------ settings that were silent
def dry_run(tmp_path, *overrides, config="configs/demo/decoder.yaml"):
    return tandem_cli("train", "decoder", "--config", config, f"output_dir={tmp_path / 'run'}",
                      f"model.path={tmp_path / 'no-model-needed'}", "--dry-run", *overrides)


def test_a_tracker_that_is_not_installed_is_one_line_with_its_install_command(tmp_path):
    import accelerate.utils

    from tandem.rl.config import TRACKERS
    from tandem.rl.trackers import REQUIREMENTS

    assert set(REQUIREMENTS) == set(TRACKERS)
    missing = [name for name in ("wandb", "comet_ml", "mlflow", "dvclive") if not getattr(accelerate.utils, REQUIREMENTS[name][0])()]
    if not missing:
        pytest.skip("every tracker this test could ask for is installed here")
    name = missing[0]
    line = assert_user_mistake(dry_run(tmp_path, f"logging.report_to=[tensorboard, {name}]"))
    assert f"logging.report_to' asks for {name}, which is not installed: pip install {REQUIREMENTS[name][1]}" in line
    assert not (tmp_path / "run").exists()


def test_report_to_as_one_string_is_a_one_item_list(tmp_path):
    proc = dry_run(tmp_path, "logging.report_to=tensorboard")
    assert proc.returncode == 0, proc.stderr
    assert "report_to:\n  - tensorboard\n" in proc.stdout
    config = tmp_path / "c.yaml"
    config.write_text(open("configs/demo/decoder.yaml").read().replace("logging:\n", "logging:\n  report_to: tensorboard\n", 1))
    proc = dry_run(tmp_path, f"data.prompts={Path('data/demo_prompts.jsonl').resolve()}", config=config)
    assert proc.returncode == 0 and "report_to:\n  - tensorboard\n" in proc.stdout, proc.stderr
    assert "is 'bogus'; allowed: tensorboard" in assert_user_mistake(dry_run(tmp_path, "logging.report_to=bogus"))


@pytest.mark.parametrize("override", ["logging.report_to=[wandb", "rewards=[{name: color", "grpo.beta='0.1"])
def test_an_override_that_is_not_yaml_is_one_line_naming_it(tmp_path, override):
    line = assert_user_mistake(dry_run(tmp_path, override))
    assert f"override '{override}': its value is not valid YAML" in line


# ------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(request, tmp_path):
    """A real tmpfs of ``request.param`` bytes mounted at tmp_path/run/checkpoints (needs root to mount), so a
    checkpoint write fails with the kernel's own ENOSPC; unmounted after the test."""
    import subprocess

    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)]).returncode != 0:  # a file left open there: detach it lazily
        subprocess.run(["umount", "-l", str(mount)], check=True)


# 200 KiB: the tiny decoder's weights (120 KiB) fit, its optimizer state (280 KiB, torch.save) does not;
# 64 KiB: the weights themselves (safetensors) do not fit.
@pytest.mark.parametrize("small_disk, file", [("200k", "decoder.optimizer.pt"), ("64k", "transformer")], indirect=["small_disk"])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial(tiny_path, tmp_path, small_disk, file):
    args = ["train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'run'}",
            f"model.path={tiny_path}", "max_steps=2", "logging.progress=false",
            "logging.sample_every=0", "reward_host.backend=local"]
    proc = tandem_cli(*args)
    assert_user_mistake(proc, f"writing {small_disk / 'step_2' / file} failed", "MiB free there", code=1, only="tandem:")
    assert list(small_disk.iterdir()) == []  # the partial checkpoint was removed
