"""``quanta quantize --nproc N``: static calibration on N local gloo ranks.

Every rank builds the model from the same MODEL spec, prepares it on the same example input
(the factory's, or the first calibration batch), calibrates on its share of the batches
(``quanta.distributed.shard``), syncs the observers and converts; rank 0 writes the file
(atomically). The result equals one process calibrating on all the batches (bit for bit for
the minmax and histogram observers).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quanta.cli.specs import UsageError

if TYPE_CHECKING:
    from quanta.config import QuantConfig


def calibrate_rank(options: dict[str, Any]) -> list[tuple[str, bool]] | None:
    """One rank's work (module level, so the launcher can start it in a new process); rank 0
    returns the summary lines ``quanta quantize`` prints."""
    import quanta
    import quanta.distributed
    from quanta.cli.commands import summary_lines
    from quanta.cli.specs import example_from, load_calib, load_config, load_factory
    from quanta.distributed import shard

    config = load_config(options["config"], "static")
    factory = load_factory(options["model"])
    calib = load_calib(options["calib"], options["batch_size"]) if options["calib"] else factory.calib
    if calib is None:
        raise UsageError("static mode needs calibration data: pass --calib DATA or return it from "
                         "the factory")
    if options["batches"]:
        calib = list(itertools.islice(calib, options["batches"]))
    calib = calib if isinstance(calib, (list, tuple)) else list(calib)
    example = example_from(factory, calib, None)
    qmodel = quanta.quantize(factory.model, shard(calib), mode="static", config=config, skip=options["skip"],
                             example_inputs=example, show_progress=False)
    quanta.save(qmodel, options["out"])
    if quanta.distributed.rank() != 0:
        return None
    return summary_lines(factory.model, qmodel, Path(options["out"]))


def quantize_nproc(args: argparse.Namespace, config: QuantConfig) -> list[tuple[str, bool]]:
    """Run ``calibrate_rank`` on ``args.nproc`` ranks and return rank 0's summary lines; a
    failed rank raises DistributedError."""
    from quanta.distributed import launch

    if args.mode != "static":
        raise UsageError(f"--nproc calibrates across processes: it needs --mode static, got {args.mode}")
    options = {"model": args.model, "calib": args.calib, "batch_size": args.batch_size,
               "batches": args.batches,
               "config": json.dumps(config.to_dict()), "skip": tuple(args.skip or ()),
               "out": args.out}
    return launch(calibrate_rank, args.nproc, (options,), timeout=args.timeout)[0]
