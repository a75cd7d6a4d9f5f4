"""Calibration and quantization-aware training across processes with torch.distributed.

- ``quanta.calibrate`` under an initialized process group syncs the observers itself
  (``sync_observers``); give each rank its share of the data with ``shard``.
- ``prepare_ddp`` wraps a QAT model in DistributedDataParallel with observers (and optionally
  BatchNorm) synchronized, so ranks stay bit-identical and ``convert`` agrees everywhere.
- ``quanta.save`` writes on rank 0 only (atomically); ``launch`` runs a function on N local
  gloo ranks (``quanta quantize --nproc N``).
"""

from quanta.distributed.calibration import sync_observers
from quanta.distributed.collective import DistributedError, rank, shard, world_size
from quanta.distributed.launch import launch
from quanta.distributed.qat import SyncBatchNorm, prepare_ddp

__all__ = ["DistributedError", "SyncBatchNorm", "launch", "prepare_ddp", "rank", "shard", "sync_observers",
           "world_size"]
