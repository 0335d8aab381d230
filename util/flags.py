"""The command-line flags of the four scripts: one vocabulary, declared once.

Every script builds its parser from these groups, so that one idea has one name everywhere; the
original's spellings are exact aliases (`--n_epochs`, `--delta_sup`, `--eval_mode finetune`,
`--use_augs`, a positional MODEL_WEIGHTS, ...), so its recorded commands parse unchanged.
Abbreviations are refused (`--epoch` is not `--epochs`). Impossible values are refused by argparse
(exit 2) naming the flag, before any data is read. `resolve` adds `--resume`: the run's own
config.json, with only the flags of RESUMABLE_FLAGS and HARDWARE_FLAGS allowed to change.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from util.io import read_json

log = logging.getLogger("flags")


def _number(kind: type, low: float | None = None, *, low_open: bool = False,
            high: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for a finite number within bounds; argparse names the flag on error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
non_negative = _number(float, 0.0)
positive = _number(float, 0.0, low_open=True)
fraction = _number(float, 0.0, low_open=True, high=1.0)
seed_int = _number(int, 0, high=2**32 - 1)  # numpy's seed range

# Flags that describe the machine, not the experiment: a resumed run takes them from its own
# command line, never from the saved config.
HARDWARE_FLAGS = ("device", "amp", "channels_last", "compile", "workers", "progress")
# What --resume accepts besides the hardware flags.
RESUMABLE_FLAGS = ("epochs", "resume", "tensorboard", "save_best", "keep_last")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as help, no abbreviated flags."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


class _SetTo(argparse.Action):
    """An alias that sets another flag's destination: `--use_augs` -> augment=True, or, with a
    mapping, `--eval_mode finetune` -> finetune=True."""

    def __init__(self, option_strings, dest, value=None, mapping=None, **kwargs):
        self.value, self.mapping = value, mapping
        super().__init__(option_strings, dest, nargs=0 if mapping is None else None,
                         choices=None if mapping is None else list(mapping), **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.value if self.mapping is None else self.mapping[values])


class _PositionalWeights(argparse.Action):
    """The original METER-ML script's positional MODEL_WEIGHTS, an alias of --model_path."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "model_path", None) is not None:
            parser.error("give the weights once: MODEL_WEIGHTS or --model_path")
        namespace.model_path = values


def add_run_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """Flags of every script: the run and the hardware; the defaults given are the script's
    published settings."""
    g = p.add_argument_group("run")
    g.add_argument("--epochs", "--n_epochs", dest="epochs", type=positive_int, default=epochs,
                   help=f"training epochs (default {epochs})")
    g.add_argument("--batch_size", type=positive_int, default=batch_size,
                   help=f"per-process batch size (default {batch_size})")
    g.add_argument("--lr", type=non_negative, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of initialisation, sample order, crops, augmentations (default 0)")
    g.add_argument("--save_path", type=Path, default=None,
                   help="run folder (default runs/<script>-<time>); refused if it holds a run")
    g.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its own config; --epochs may extend it, hardware flags may "
                        "change")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a --save_path that holds a run, removing its files first")
    g.add_argument("--save_best", action=argparse.BooleanOptionalAction, default=True,
                   help="keep best.pt, the weights of the best evaluation, beside last.pt (default on)")
    g.add_argument("--keep_last", choices=["full", "weights"], default="full",
                   help="what last.pt keeps once the run has finished: full (weights, optimiser, RNG: the run can be "
                        "extended with --resume and a larger --epochs; default) or weights (about a third of the size)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars into RUN/tensorboard (needs: pip install tensorboard)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the networks, losses stay float32 (default off: float32, as the original)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for the conv nets (default: on with CUDA; a memory layout, "
                        "the numerics stay float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    g.add_argument("--workers", type=non_negative_int, default=None,
                   help="DataLoader workers per process (default: CPU count / processes, at most 8, with CUDA; "
                        "1 on CPU)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only when stderr is a terminal, so log files get clean lines)")


def add_data_args(p: argparse.ArgumentParser, *, root: str, what: str) -> argparse._ArgumentGroup:
    """--data_root, and which part of the training set a run reads: --data_ratio, --subset,
    --subset_seed. Returns the group, for the script's own data flags."""
    g = p.add_argument_group("data")
    g.add_argument("--data_root", type=Path, default=Path(root), help=f"{what} (default {root})")
    g.add_argument("--data_ratio", type=fraction, default=1.0,
                   help="fraction of the training set: its first int(ratio * N) items, as the original (default 1.0)")
    g.add_argument("--subset", choices=["first", "random"], default="first",
                   help="first: the data set's first items, as the original (default); random: a fixed random "
                        "subset drawn from --subset_seed")
    g.add_argument("--subset_seed", type=seed_int, default=0,
                   help="seed of --subset random, fixed across --seed (default 0)")
    return g


def add_image_dirs_arg(g: argparse._ArgumentGroup) -> None:
    """--train_image_dirs: METER-ML training on the image sets under some top folders only."""
    g.add_argument("--train_image_dirs", nargs="+", default=None, metavar="DIR",
                   help="train only on the image sets found under these top folders of --data_root, e.g. "
                        "train_images_1, the only one the original's download_all.sh fetches (default: all; "
                        "docs/differences.md)")


def add_model_args(p: argparse.ArgumentParser, *, archs: Sequence[str], arch: str, weights: bool = True,
                   original_spellings: bool = False) -> argparse._ArgumentGroup:
    """--arch, and --model_path (pre-trained weights) where the script fine-tunes. With
    `original_spellings` (METER-ML), `--model` and a positional MODEL_WEIGHTS are aliases."""
    g = p.add_argument_group("model")
    names = ["--arch", "--model"] if original_spellings else ["--arch"]
    g.add_argument(*names, dest="arch", choices=list(archs), default=arch, help=f"encoder (default {arch})")
    if weights:
        g.add_argument("--model_path", default=None, help="pre-trained weights in the released layout, or 'random'")
        if original_spellings:
            p.add_argument("MODEL_WEIGHTS", nargs="?", default=argparse.SUPPRESS, action=_PositionalWeights,
                           help="the original's spelling of --model_path")
    return g


def add_backbone_args(g: argparse._ArgumentGroup, *, backbones: Sequence[str]) -> None:
    """Pre-trained single-modality backbones for the dual ResNet (models.load_backbone_weights; `backbones`: the
    named pairs), and --fresh_first_conv for data whose band counts differ from the weights' first layers."""
    g.add_argument("--backbones", choices=list(backbones), default=None,
                   help="start both backbones from TorchGeo's SSL4EO-S12 ResNet-50 weights (MoCo or DeCUR), downloaded "
                        "once into torch hub's cache and hash-checked; projection heads and classifier start fresh. "
                        "They were trained on --normalize ssl4eo inputs")
    g.add_argument("--s1_backbone", type=Path, default=None, metavar="PATH",
                   help="start the S1 backbone from a ResNet state dict in torchvision / timm layout (no fc needed)")
    g.add_argument("--s2_backbone", type=Path, default=None, metavar="PATH",
                   help="start the S2 backbone from a ResNet state dict in torchvision / timm layout (no fc needed)")
    g.add_argument("--fresh_first_conv", action="store_true",
                   help="where the data's band count differs from the first layer of the weights loaded (--model_path "
                        "or the backbones), start that layer afresh instead of refusing")


def check_backbone_args(p: argparse.ArgumentParser, args: argparse.Namespace, pretrained_arch: str) -> None:
    """Refuse weights given twice, named weights for another architecture than `pretrained_arch`, and a
    --fresh_first_conv without weights; the scripts' check functions call it."""
    files = args.s1_backbone is not None or args.s2_backbone is not None
    whole = getattr(args, "model_path", None) not in (None, "random")
    if args.backbones and files:
        p.error("--backbones names both backbones' weights: give it or --s1_backbone / --s2_backbone, not both")
    if whole and (args.backbones or files):
        p.error("--model_path loads the whole dual ResNet, backbones included; --backbones, --s1_backbone and "
                "--s2_backbone load only its backbones: give one of the two")
    if args.backbones and args.arch != pretrained_arch:
        p.error(f"--backbones {args.backbones} are {pretrained_arch} weights, not {args.arch}: "
                f"pass --arch {pretrained_arch}")
    if args.fresh_first_conv and not (whole or args.backbones or files):
        p.error("--fresh_first_conv changes nothing without pre-trained weights (--model_path or the backbone flags)")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace, manifest: bool, data: str) -> None:
    """--normalize's default (stats for a manifest, else seed; config.json records it), --s2_bands refused on `data`
    (DFC2020, SEN12MS: the 13 L1C bands), a warning for --backbones fed other inputs than theirs. `manifest`: the
    script's `datasets.is_manifest(args.data_root)`."""
    args.normalize = args.normalize or ("stats" if manifest else "seed")
    if args.s2_bands and not manifest:
        p.error(f"--s2_bands names the bands of a manifest's S2; {args.data_root} is not a manifest ({data}'s S2 "
                "are the 13 L1C bands)")
    if args.backbones and args.normalize != "ssl4eo":
        log.warning("--backbones %s were trained on SSL4EO-S12 inputs scaled as --normalize ssl4eo; this run feeds "
                    "--normalize %s inputs", args.backbones, args.normalize)


def add_normalize_arg(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--normalize", choices=["seed", "ssl4eo", "stats"], default=None,
                   help="input scaling (datasets.normalize): seed, every channel of every crop (and augmented view) "
                        "divided by its maximum after clipping, the original's; ssl4eo, S1 dB standardised with "
                        "SSL4EO-S12's band statistics and S2 / 10000, what --backbones expect; stats, every band "
                        "standardised by the training split's mean and std (docs/data.md). Default: stats for a "
                        "manifest, seed for DFC2020 / SEN12MS; config.json records the value used")


def add_s2_bands_arg(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--s2_bands", type=lambda text: [b.strip() for b in text.split(",") if b.strip()], default=None,
                   metavar="B01,B02,...",
                   help="a manifest's S2 band names in file order (default: the 13 L1C bands B01-B08, B8A, B09-B12 "
                        "for 13-band S2, the 12 L2A bands, no B10, for 12-band S2; other counts need it)")


def add_finetune_flag(g: argparse._ArgumentGroup, *, default: bool, eval_mode_alias: bool = False) -> None:
    """--finetune / --no-finetune: train everything, or the classifier heads only (frozen encoder)."""
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=default,
                   help="train the whole network; --no-finetune: the classifier head(s) only "
                        f"(default {'--finetune' if default else '--no-finetune'}, as the original)")
    if eval_mode_alias:
        g.add_argument("--eval_mode", dest="finetune", action=_SetTo, mapping={"linear": False, "finetune": True},
                       help="the original's spelling: linear = --no-finetune, finetune = --finetune")


def add_augment_args(g: argparse._ArgumentGroup, *, default: bool | None, impls: Sequence[str], what: str = "",
                     use_augs: bool = False, no_augs: bool = False) -> None:
    """--augment / --no-augment (not with `default` None: the script augments when its method
    needs it) and --augment_impl, one of `impls`; `use_augs` / `no_augs` add the original's spellings
    `--use_augs` (= --augment) and `--no_augs` (= --no-augment)."""
    if default is not None:
        g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=default,
                       help=f"{what} (default {'on' if default else 'off'}, as the original)")
    if use_augs:
        g.add_argument("--use_augs", dest="augment", action=_SetTo, value=True,
                       help="the original's spelling of --augment")
    if no_augs:
        g.add_argument("--no_augs", dest="augment", action=_SetTo, value=False,
                       help="the original's spelling of --no-augment")
    g.add_argument("--augment_impl", choices=list(impls), default="torchvision",
                   help="torchvision: the original's augmented pixels (nearest-neighbour rotation, bilinear "
                        "resized crop; default); fused: one bilinear resampling per batch, smoother views")


def add_optimizer_args(g: argparse._ArgumentGroup, *, weight_decay: float, momentum: bool) -> None:
    """--weight_decay, and --momentum for the SGD scripts (plain SGD by default, as the original)."""
    g.add_argument("--weight_decay", type=non_negative, default=weight_decay,
                   help=f"weight decay (default {weight_decay})")
    if momentum:
        g.add_argument("--momentum", type=non_negative, default=0.0,
                       help="SGD momentum (default 0, the original's plain SGD)")


def add_method_args(p: argparse.ArgumentParser, *, head_lr: float | None) -> argparse._ArgumentGroup:
    """The fine-tuning method: SupCon, the loss weights, where CE reads, the heads' learning rate.
    Returns the group, for the script's own method flags."""
    g = p.add_argument_group("method")
    g.add_argument("--use_sup_con", action="store_true", help="add the supervised contrastive loss")
    g.add_argument("--sup_weight", "--sup_delta", "--delta_sup", dest="sup_weight", type=non_negative, default=1.0,
                   help="weight of SupCon (default 1.0)")
    g.add_argument("--ce_weight", "--cross_delta", "--delta_lin", dest="ce_weight", type=non_negative, default=1.0,
                   help="weight of cross-entropy (default 1.0)")
    add_temperature_arg(g, 0.07, "SupCon temperature and base temperature")
    g.add_argument("--ce_from", choices=["separate", "joint"], default="separate",
                   help="separate: CE reads a second encoder pass over the originals, as the original (default); "
                        "joint: CE reads the original half of the joint (augmented, original) pass, a third less "
                        "compute")
    g.add_argument("--head_lr", "--classifier_lr", dest="head_lr", type=non_negative, default=head_lr,
                   help="learning rate of the classifier head(s) (default: "
                        + ("--lr" if head_lr is None else str(head_lr)) + ")")
    return g


def add_temperature_arg(g: argparse._ArgumentGroup, default: float, what: str) -> None:
    g.add_argument("--temperature", "--tau", dest="temperature", type=positive, default=default,
                   help=f"{what} (default {default})")


def add_eval_args(p: argparse.ArgumentParser, *, dense_after: int) -> None:
    """When and how the fine-tuning scripts evaluate, and the run's label in summaries."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_batch_size", type=positive_int, default=None,
                   help="evaluation batch size (default 2 x --batch_size)")
    g.add_argument("--eval_every", type=non_negative_int, default=10,
                   help="evaluate after 0-based epochs that are multiples of N (0: never), and after the last "
                        "(default 10)")
    g.add_argument("--eval_dense_after", type=int, default=dense_after,
                   help=f"and after every 0-based epoch above this one (default {dense_after}, the original's)")
    g.add_argument("--name", default=None,
                   help="configuration label for summaries (default: derived from the flags)")


def resolve(p: argparse.ArgumentParser, argv: Sequence[str] | None = None,
            script: str | None = None) -> argparse.Namespace:
    """Parse flags; with --resume, take the run's own config and refuse flags that cannot change,
    and a run of another script than `script` (before its flags are checked as this script's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.resume is None:
        return args
    if args.overwrite:
        p.error("--resume continues a run and --overwrite starts one over: choose one")
    config_path = args.resume / "config.json"
    if not config_path.is_file():
        p.error(f"--resume {args.resume}: no config.json there; is it a run folder?")
    try:
        saved = read_json(config_path)
    except ValueError as error:
        p.error(f"--resume {args.resume}: {error}")
    if not isinstance(saved, dict):
        p.error(f"--resume {args.resume}: {config_path} holds no flags (a JSON {type(saved).__name__}, not an object)")
    if script is not None and saved.get("script", script) != script:
        p.error(f"--resume {args.resume}: it is a run of {saved['script']}.py, not of {script}.py: resume it with "
                f"{saved['script']}.py")
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    explicit = {a.dest for a in p._actions if given & set(a.option_strings)}
    # A flag given again with its saved value changes nothing (a recorded command plus --resume).
    current = as_json(args)
    refused = sorted(d for d in explicit - set(HARDWARE_FLAGS) - set(RESUMABLE_FLAGS)
                     if d not in saved or not _same(current[d], saved[d]))
    if refused:
        p.error(f"--resume continues {args.resume} with its own config.json; these flags cannot change: "
                f"{', '.join('--' + r for r in refused)}. Drop them, or start a new run")
    resumed = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in HARDWARE_FLAGS}})
    if "epochs" in explicit:
        resumed.epochs = args.epochs
    resumed.resume, resumed.save_path, resumed.overwrite = args.resume, args.resume, False
    return resumed


def _same(given, saved) -> bool:
    """A flag's value equals its saved one: paths compared after resolving them."""
    if isinstance(given, str) and isinstance(saved, str) and given != saved:
        return Path(given).resolve() == Path(saved).resolve()
    return json.loads(json.dumps(given)) == saved


def as_json(args: argparse.Namespace) -> dict:
    """The flags as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
