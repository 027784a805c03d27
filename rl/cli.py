"""The ``tandem`` command line.

    tandem train ar|decoder|joint --config FILE [key.sub=value ...] [--dry-run]
    tandem sample --config FILE [key.sub=value ...] [--checkpoint DIR [--ema]] [--num-prompts N]
    tandem score --reward NAME_OR_PATH [--args JSON] [--reward ...] --images DIR --prompts FILE [--sources DIR] [--backend local|ray]
    tandem rewards
    tandem eval --config FILE [--checkpoint DIR [--ema]] [--prompts FILE] [--batch-size N] [key.sub=value ...]
    tandem export RUN/checkpoints/step_N OUT [--ema] [--config FILE]
    tandem report RUN_DIR

Every command takes ``--log-level`` (default info): tandem's messages (loggers ``tandem.*``) go to stderr.

A user mistake (unknown key, wrong type, missing file or weights, unknown reward) prints one line on stderr
naming what is wrong and how to fix it, and exits 2 — no traceback, nothing half-written. A reward that
breaks at run time (RewardError), or a job that cannot go on for a cause outside its config (RunError: the disk
filled while a checkpoint was written), prints one line naming it and exits 1; SIGINT/SIGTERM stop a training job at
a checkpoint and exit 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from tandem.core.errors import RunError
from tandem.rewards.base import RewardError
from tandem.rl.config import ConfigError, load_config, to_yaml
from tandem.rl.runtime import LOG_LEVELS, configure_environment, configure_logging, configure_torch


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user mistake
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tandem", description="RL post-training for two-stage AR + flow image generators.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="level of tandem's messages on stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    train = command("train", help="run a GRPO (ar), flow-GRPO (decoder) or alternating (joint) job")
    train.add_argument("stage", choices=["ar", "decoder", "joint"])
    train.add_argument("--config", required=True, help="YAML job config (see configs/)")
    train.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.beta=0.01")

    sample = command("sample", help="write an image grid from the configured models")
    sample.add_argument("--config", required=True)
    sample.add_argument("--checkpoint", default=None, help="a checkpoint folder of a run (checkpoints/step_N)")
    sample.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights instead of the trained ones")
    sample.add_argument("--num-prompts", type=int, default=None, help="only the first N prompts")
    sample.add_argument("overrides", nargs="*")

    score = command("score", help="score images with rewards; one JSON object per image on stdout")
    score.add_argument("--reward", action="append", required=True, help="registered name or pkg.module:attr")
    score.add_argument("--images", required=True, help="folder of .png/.jpg images")
    score.add_argument("--prompts", required=True, help=".txt or .jsonl prompt file, one entry per image")
    score.add_argument("--sources", default=None, help="folder of the edits' source images (same file names), "
                       "handed to the rewards as 'reference' (e.g. source_structure, lpips)")
    score.add_argument("--backend", choices=["local", "ray"], default="local")
    score.add_argument("--args", action="append", default=[], metavar="JSON",
                       help="JSON object of args for the --reward at the same position, e.g. '{\"clip_weights\": \"...\"}'")

    command("rewards", help="list registered rewards")

    evaluate = command("eval", help="text-rendering eval: OCR word accuracy and NED, per language")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--checkpoint", default=None, help="a checkpoint folder of a run (checkpoints/step_N)")
    evaluate.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights instead of the trained ones")
    evaluate.add_argument("--prompts", default=None, help="prompt file with target texts (default: the shipped "
                                                         "tandem/data/text_eval_prompts.jsonl)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    evaluate.add_argument("overrides", nargs="*")

    export = command("export", help="write a complete pipeline folder with a checkpoint's weights merged")
    export.add_argument("checkpoint", help="a checkpoint folder of a run (RUN/checkpoints/step_N)")
    export.add_argument("out", help="new folder for the pipeline (save_pretrained layout)")
    export.add_argument("--ema", action="store_true", help="merge the checkpoint's EMA weights instead")
    export.add_argument("--config", default=None, help="job config naming the base pipeline (default RUN/config.yaml)")

    report = command("report", help="write RUN_DIR/report.html: curves, sample grids, metrics, config, eval")
    report.add_argument("run_dir")
    return p


def _train(args) -> int:
    cfg = load_config(args.config, args.overrides, stage=args.stage)
    from tandem.rl.session import check_rewards, train, train_joint

    if args.dry_run:
        check_rewards(cfg)  # reward names, import paths and weight paths, without loading anything
        print(to_yaml(cfg), end="")
        return 0

    configure_torch(cfg)
    if cfg.distributed.launcher == "ray_train":
        from tandem.rl.launch import launch_ray_train

        out = launch_ray_train(cfg, args.stage)
    else:
        out = train_joint(cfg) if args.stage == "joint" else train(cfg, stage=args.stage)
    print(f"run directory: {out}")
    return 0


def _sample(args) -> int:
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    cfg = load_config(args.config, args.overrides, stage="sample")
    from tandem.rl.sample import run_sample

    print(f"sample grid: {run_sample(cfg, args.num_prompts, args.checkpoint, args.ema)}")
    return 0


def _score(args) -> int:
    from tandem.rewards.cli import cmd_score

    if len(args.args) > len(args.reward):
        raise ConfigError(f"score: {len(args.args)} --args for {len(args.reward)} --reward; give one --args per --reward, in order")
    reward_args = []
    for text in args.args:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"score: --args {text!r} is not JSON ({e.msg}); give an object like '{{\"key\": 1}}'") from None
        if not isinstance(value, dict):
            raise ConfigError(f"score: --args {text!r} must be a JSON object of the reward's args")
        reward_args.append(value)
    return cmd_score(args.reward, args.images, args.prompts, backend=args.backend, reward_args=reward_args,
                     sources_dir=args.sources)


def _rewards(args) -> int:
    from tandem.rewards.cli import cmd_rewards

    return cmd_rewards()


def _eval(args) -> int:
    cfg = load_config(args.config, args.overrides, stage="sample")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    from tandem.rl.eval import format_table, text_eval

    result = text_eval(cfg, checkpoint=args.checkpoint, prompts=args.prompts, batch_size=args.batch_size, ema=args.ema)
    print(f"text eval of {args.checkpoint or 'the base model'} on {result['meta']['prompts']}")
    print(format_table(result))
    print(f"written: {result['output']}/text_eval.json")
    return 0


def _export(args) -> int:
    from tandem.rl.export import export_pipeline

    print(f"pipeline: {export_pipeline(args.checkpoint, args.out, ema=args.ema, config=args.config)}")
    return 0


def _report(args) -> int:
    from tandem.rl.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


COMMANDS = {"train": _train, "sample": _sample, "score": _score, "rewards": _rewards, "eval": _eval, "export": _export,
            "report": _report}


def main(argv: Optional[List[str]] = None) -> int:
    configure_environment()
    if os.getcwd() not in sys.path:  # user reward modules next to the config import like `trl grpo`'s
        sys.path.insert(0, os.getcwd())
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        unknown = [x for x in extra if x.startswith("-") or "=" not in x]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = list(getattr(args, "overrides", [])) + extra
        configure_logging(args.log_level)
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except RewardError as e:  # a reward that broke at run time: one line naming it (a checkpoint was taken)
        print(f"tandem: reward error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    except RunError as e:  # a cause outside the config (a full disk): one line naming it
        print(f"tandem: error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: a training job stops at a checkpoint (rl/signals.py)
        print(f"tandem: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
