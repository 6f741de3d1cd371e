"""The decode step with the C kernels of this working tree against those of an earlier revision, alternated.

    python benchmarks/kernels_ab.py [--base HEAD] [--rows 1,8,16] [--context 300] [--repeats 6]

Builds `src/fedpit/native/`'s sources as they are at `--base` (git) and as they are now into two libraries
(native/build.py, in a temporary cache), then times 20 decode steps of the embedded SmolLM2 (LoRA merged, as in
generation) after a prefill of `rows` random prompts of `context` tokens, with one library then the other,
the order alternated, `--repeats` times. Prints the median step time of each and the per-pair ratios with
their 95% interval (training_ab.py's report): what a kernel change is worth, measured in one process, where
absolute step times move between runs of decode_profile.py by more than the change. Both libraries are called
through this tree's `DecodeKernels`, so `--base` must have the same C files and functions: 1f0dd71 or later (it
added decode_layers.c); an older comparison is rerun from a checkout of its own revision.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_ab import report  # noqa: E402

from fedpit.config import LoraConfig, ModelConfig  # noqa: E402
from fedpit.decode_step import DecodeStep  # noqa: E402
from fedpit.engines.encoding import last_positions  # noqa: E402
from fedpit.engines.kvcache import preallocated_cache  # noqa: E402
from fedpit.model import load_model, resolve_model_path  # noqa: E402
from fedpit.native import build as native_build  # noqa: E402
from fedpit.native.kernels import DecodeKernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def library_at(revision: str, directory: Path) -> Path:
    """The kernels built from the native sources as they are at `revision`."""
    sources = directory / "src"
    sources.mkdir(parents=True)
    for path in (*native_build.SOURCES, *native_build.HEADERS):
        relative = path.relative_to(REPO)
        shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=REPO, capture_output=True, text=True,
                               check=False)
        if shown.returncode != 0:
            raise SystemExit(f"kernels_ab.py: {relative} is not in revision {revision} ({shown.stderr.strip()}); "
                             f"pick a --base that has every source the kernels build from now")
        (sources / path.name).write_text(shown.stdout)
    return native_build.build(directory / "cache", source_dir=sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the git revision whose kernels are the baseline")
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    handle = load_model(ModelConfig(name=resolve_model_path("smollm2-135m-instruct")),
                        LoraConfig(rank=16, alpha=32, target_modules=TARGETS))
    with tempfile.TemporaryDirectory() as scratch:
        kernels = {"base": DecodeKernels(library_at(args.base, Path(scratch) / "base")),
                   "now": DecodeKernels(native_build.build(Path(scratch) / "now"))}
        with handle.inference():
            model = handle.model
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            steps = {name: DecodeStep.build(base, k) for name, k in kernels.items()}
            if any(step is None or step.native is None for step in steps.values()):
                parser.error("the decode step with C kernels does not apply here (not bf16 on a CPU with packed "
                             "weights, or an architecture it does not mirror)")
            for rows in (int(r) for r in args.rows.split(",")):
                runs: dict[bool, list[dict]] = {True: [], False: []}
                for repeat in range(args.repeats):
                    for now in (True, False) if repeat % 2 == 0 else (False, True):
                        runs[now].append({"ms": _step_ms(model, steps["now" if now else "base"], rows,
                                                         args.context)})
                report(f"kernels now vs {args.base}, {rows} rows", runs, key="ms", lower_is_better=True)


def _step_ms(model, step: DecodeStep, rows: int, context: int, steps: int = 20) -> float:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (rows, context), generator=generator)
    mask = torch.ones(rows, context, dtype=torch.long)
    mask[1::2, :8] = 0  # left padding, as in the engine's batches
    cache = preallocated_cache(model.config, context + steps + 8)
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=last_positions(context, 1, ids.device)).logits[:, -1]
    token, position = logits.argmax(-1), torch.full((rows,), context)
    for index in range(steps + 3):  # three warm-up steps
        if index == 3:
            began = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        token = step(token, mask, position, cache).argmax(-1)
        position = position + 1
    return (time.perf_counter() - began) / steps * 1e3


if __name__ == "__main__":
    main()
